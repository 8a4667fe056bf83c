// Unit tests of the control reply stream arithmetic (SPEC 2.2 "Out"), no
// mount: positions against the file offset, end-of-file, the 1 MiB window
// kept behind the furthest read, and the memory bound.
#include "fs/control_stream.h"

#include <gtest/gtest.h>

#include <cerrno>
#include <string>

namespace cbw::fs {
namespace {

constexpr uint64_t kMiB = 1 << 20;

// Reads through `s` at `off` and expects success.
std::string ReadOk(ControlStream& s, uint64_t off, size_t size, const LastReply& last) {
  auto r = s.Read(off, size, last);
  EXPECT_TRUE(r.ok()) << "offset " << off << ": " << r.status().message();
  return r.ok() ? *r : std::string();
}

TEST(LastReply, ReadsFromAnOffset) {
  LastReply last;
  EXPECT_EQ(last.Read(0, 100), "");
  last.Set("{\"return\": {}}\n");
  EXPECT_EQ(last.Read(0, 100), "{\"return\": {}}\n");
  EXPECT_EQ(last.Read(2, 6), "return");
  EXPECT_EQ(last.Read(15, 10), "");
  EXPECT_EQ(last.Read(1000, 10), "");
  last.Set("x\n");
  EXPECT_EQ(last.Read(0, 100), "x\n");
}

TEST(ControlStream, AnOpenWithoutResponsesReadsTheLastReplyOfAnyOpen) {
  LastReply last;
  last.Set("{\"error\": {}}\n");
  ControlStream s;
  EXPECT_EQ(ReadOk(s, 0, 100, last), "{\"error\": {}}\n");
  EXPECT_EQ(ReadOk(s, 2, 5, last), "error");
  // A write of whitespace alone runs nothing and gives no response.
  s.Record("", 3);
  EXPECT_EQ(ReadOk(s, 0, 100, last), "{\"error\": {}}\n");
  // Once it has a response of its own, it reads only its own stream.
  s.Record("{\"return\": 1}\n", 20);
  last.Set("other\n");
  EXPECT_EQ(ReadOk(s, 23, 100, last), "{\"return\": 1}\n");
}

TEST(ControlStream, AReadAtOffsetPStartsAtPMinusBytesWritten) {
  LastReply last;
  ControlStream s;
  // `exec 3<>control; echo cmd >&3; head -1 <&3`: the offset moves over the
  // write (10 bytes), then over what is read.
  s.Record("one\n", 10);
  EXPECT_EQ(ReadOk(s, 10, 2, last), "on");
  EXPECT_EQ(ReadOk(s, 12, 100, last), "e\n");
  EXPECT_EQ(ReadOk(s, 14, 100, last), "") << "end-of-file past the end";
  EXPECT_EQ(ReadOk(s, 1000, 100, last), "");
  // The next command (7 bytes): offset 21 is stream position 4.
  s.Record("two\n", 7);
  EXPECT_EQ(ReadOk(s, 21, 100, last), "two\n");
  // Read ahead then seek back (head does): any position still kept works.
  EXPECT_EQ(ReadOk(s, 17, 100, last), "one\ntwo\n");
  // An offset below the bytes written reads from the start.
  EXPECT_EQ(ReadOk(s, 0, 100, last), "one\ntwo\n");
}

TEST(ControlStream, AFailedWriteAddsItsReplyButNotItsBytes) {
  LastReply last;
  ControlStream s;
  s.Record("{\"error\": 1}\n", 0);  // the write failed: the offset did not move
  EXPECT_EQ(ReadOk(s, 0, 100, last), "{\"error\": 1}\n");
  s.Record("{\"return\": 2}\n", 5);
  EXPECT_EQ(ReadOk(s, 5 + 13, 100, last), "{\"return\": 2}\n");
}

TEST(ControlStream, UnreadRepliesAreAllKept) {
  LastReply last;
  ControlStream s;
  std::string big(5 * kMiB, 'a');
  big[0] = 'b';
  big.back() = 'z';
  s.Record(big, 100);
  EXPECT_EQ(s.oldest_readable(), 0u);
  EXPECT_EQ(ReadOk(s, 100, 1, last), "b");
  EXPECT_EQ(ReadOk(s, 100 + big.size() - 1, 10, last), "z");
}

TEST(ControlStream, OneMiBBehindTheFurthestReadIsKeptAndNoMore) {
  LastReply last;
  ControlStream s;
  std::string data;
  for (int i = 0; data.size() < 3 * kMiB; ++i) data += std::to_string(i) + "\n";
  s.Record(data, 0);
  uint64_t off = 0;
  for (;;) {
    std::string got = ReadOk(s, off, 4096, last);
    if (got.empty()) break;
    ASSERT_EQ(got, data.substr(off, got.size()));
    off += got.size();
  }
  ASSERT_EQ(off, data.size());
  EXPECT_EQ(s.oldest_readable(), data.size() - kMiB);
  // Exactly 1 MiB back: works, and reads what was there.
  EXPECT_EQ(ReadOk(s, off - kMiB, 100, last), data.substr(off - kMiB, 100));
  // One byte further: EINVAL.
  auto r = s.Read(off - kMiB - 1, 100, last);
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.status().code(), EINVAL);
  // So does an offset below what was written (position 0).
  EXPECT_FALSE(s.Read(0, 1, last).ok());
  // Reading back does not move the window.
  EXPECT_EQ(s.oldest_readable(), data.size() - kMiB);
  EXPECT_LE(s.kept_bytes(), kMiB + 2 * 64 * 1024);
}

TEST(ControlStream, AMillionCommandsOnOneOpenKeepMemoryBounded) {
  LastReply last;
  ControlStream s;
  const std::string cmd = "{\"execute\":\"qmp_capabilities\"}";
  const std::string reply = "{\"return\": {}}\n";
  uint64_t offset = 0;
  size_t most_kept = 0;
  for (int batch = 0; batch < 1000; ++batch) {
    std::string replies;
    for (int i = 0; i < 1000; ++i) replies += reply;
    s.Record(replies, 1000 * cmd.size());
    offset += 1000 * cmd.size();
    size_t got = 0;
    while (got < replies.size()) {
      std::string part = ReadOk(s, offset, 8192, last);
      ASSERT_FALSE(part.empty());
      ASSERT_EQ(part, replies.substr(got, part.size()));
      got += part.size();
      offset += part.size();
    }
    most_kept = std::max(most_kept, s.kept_bytes());
  }
  // The window (1 MiB), one batch unread, and the two chunks (64 KiB) at
  // its ends.
  EXPECT_LE(most_kept, kMiB + 1000 * reply.size() + 2 * 64 * 1024);
  RecordProperty("most_bytes_kept", std::to_string(most_kept));
}

}  // namespace
}  // namespace cbw::fs
