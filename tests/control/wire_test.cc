#include "control/wire.h"

#include <gtest/gtest.h>

#include <cerrno>
#include <chrono>
#include <string>

namespace cbw::control {
namespace {

using nlohmann::ordered_json;

TEST(ParseWrite, OneObject) {
  ParsedWrite p = ParseWrite(R"({"execute": "query-jobs"})");
  ASSERT_EQ(p.error, 0) << p.message;
  ASSERT_EQ(p.commands.size(), 1u);
  EXPECT_EQ(p.commands[0]["execute"], "query-jobs");
}

TEST(ParseWrite, SeveralObjectsWithAndWithoutWhitespace) {
  ParsedWrite p = ParseWrite("\n {\"a\":1}{\"b\":[{\"c\":\"}\"}]}\r\n\t{\"d\":\"\\\"{\"}\n");
  ASSERT_EQ(p.error, 0) << p.message;
  ASSERT_EQ(p.commands.size(), 3u);
  EXPECT_EQ(p.commands[1]["b"][0]["c"], "}");
  EXPECT_EQ(p.commands[2]["d"], "\"{");
}

TEST(ParseWrite, WhitespaceOnlyIsNoCommands) {
  ParsedWrite p = ParseWrite(" \n\t\r\n");
  EXPECT_EQ(p.error, 0);
  EXPECT_TRUE(p.commands.empty());
  EXPECT_EQ(ParseWrite("").commands.size(), 0u);
}

TEST(ParseWrite, UnfinishedValueIsEinval) {
  for (const char* text : {R"({"execute": "query-jobs")", R"({"execute": "query-jobs)",
                           R"({"execute": "x"} {)", "{\"a\":\"\\"}) {
    ParsedWrite p = ParseWrite(text);
    EXPECT_EQ(p.error, EINVAL) << text;
    EXPECT_EQ(p.message, "JSON parse error, the write ends inside an unfinished JSON value")
        << text;
    EXPECT_TRUE(p.commands.empty());
  }
}

TEST(ParseWrite, NonObjectsAreEinval) {
  for (const char* text : {"[1]", "\"x\"", "42", "-1", "true", "null", R"({"a":1} [2])"}) {
    ParsedWrite p = ParseWrite(text);
    EXPECT_EQ(p.error, EINVAL) << text;
    EXPECT_EQ(p.message, "QMP input must be a JSON object") << text;
  }
  ParsedWrite p = ParseWrite("bad");
  EXPECT_EQ(p.error, EINVAL);
  EXPECT_EQ(p.message, "JSON parse error, unexpected character at offset 0");
  p = ParseWrite(R"({"execute": "query-jobs"} x)");
  EXPECT_EQ(p.error, EINVAL);
  EXPECT_TRUE(p.commands.empty());
}

TEST(ParseWrite, SyntaxErrorsInsideObjectsAreEinval) {
  for (const char* text : {"{]", "{\"a\":}", "{\"a\" 1}", "{\"a\":1,}", "{'a':1}", "{\"a\":01}",
                           "{\"a\":1} {\"b\":tru}", "{\"a\":NaN}", "{/*c*/\"a\":1}",
                           "{\"a\":\"\\x\"}", "{\"a\":\"\\ud800\"}"}) {
    ParsedWrite p = ParseWrite(text);
    EXPECT_EQ(p.error, EINVAL) << text;
    EXPECT_TRUE(p.commands.empty()) << text;
  }
}

TEST(ParseWrite, DuplicateKeysAreEinval) {
  ParsedWrite p = ParseWrite(R"({"execute": "query-block", "id": 1, "id": 2})");
  EXPECT_EQ(p.error, EINVAL);
  EXPECT_EQ(p.message, "JSON parse error, duplicate key in the object at offset 0");
  p = ParseWrite(R"({"a": {"x": 1, "y": {"x": 2}}, "b": [{"x": 1}, {"x": 1}]})");
  EXPECT_EQ(p.error, 0) << p.message;
  p = ParseWrite(R"({"a": 1} {"b": [{"x": 1, "x": 1}]})");
  EXPECT_EQ(p.error, EINVAL);
  EXPECT_EQ(p.message, "JSON parse error, duplicate key in the object at offset 9");
}

TEST(ParseWrite, NulBytesAreEinval) {
  std::string text = R"({"execute": "query-jobs"})";
  text.push_back('\0');
  ParsedWrite p = ParseWrite(text);
  EXPECT_EQ(p.error, EINVAL);
  EXPECT_EQ(p.message, "JSON parse error, unexpected character at offset 25");
  EXPECT_TRUE(p.commands.empty());
  p = ParseWrite(std::string("{\"a\":\"x\0y\"}", 11));
  EXPECT_EQ(p.error, EINVAL);
  EXPECT_NE(p.message.find("NUL"), std::string::npos) << p.message;
  EXPECT_NE(p.message.find(" at offset 7"), std::string::npos) << p.message;
  p = ParseWrite(std::string("{\"a\":1,\0\"b\":2}", 14));
  EXPECT_EQ(p.error, EINVAL);
  EXPECT_NE(p.message.find(" at offset 7"), std::string::npos) << p.message;
  p = ParseWrite(R"({"execute": "drive-backup", "arguments": {"target": "/tmp/a\u0000b"}})");
  EXPECT_EQ(p.error, EINVAL);
  EXPECT_EQ(p.message, "JSON parse error, \\u0000 in a string in the object at offset 0");
  p = ParseWrite(R"({"a": 1} {"a\u0000": 1})");
  EXPECT_EQ(p.error, EINVAL);
  EXPECT_EQ(p.message, "JSON parse error, \\u0000 in a string in the object at offset 9");
  // Nothing of a write runs when any of it is refused.
  p = ParseWrite(std::string(R"({"execute": "query-jobs"} {"a":"x)") + '\0' + "\"}");
  EXPECT_EQ(p.error, EINVAL);
  EXPECT_TRUE(p.commands.empty());
}

TEST(ParseWrite, InvalidUtf8IsEinval) {
  // Each with the offset of the byte at which the sequence is known bad.
  const std::pair<const char*, size_t> cases[] = {
      {"{\"a\":\"\xff\"}", 6},              // never valid
      {"{\"a\":\"\xc0\xaf\"}", 6},          // overlong '/'
      {"{\"a\":\"\xed\xa0\x80\"}", 7},      // UTF-16 surrogate
      {"{\"a\":\"\xf4\x90\x80\x80\"}", 7},  // above U+10FFFF
      {"{\"a\":\"\xe2\x82\"}", 8},          // cut short
      {"{\"\xff\":1}", 2},                  // in a key
      {"{\"a\":1} {\"b\":\"\xfe\"}", 14},   // in a later object
  };
  for (const auto& [text, offset] : cases) {
    ParsedWrite p = ParseWrite(text);
    EXPECT_EQ(p.error, EINVAL) << text;
    EXPECT_TRUE(p.commands.empty()) << text;
    EXPECT_NE(p.message.find("UTF-8"), std::string::npos) << p.message;
    EXPECT_NE(p.message.find(" at offset " + std::to_string(offset)), std::string::npos)
        << text << ": " << p.message;
  }
  // Outside any string: not JSON at all.
  ParsedWrite p = ParseWrite("{\"a\":1}\x80");
  EXPECT_EQ(p.error, EINVAL);
  EXPECT_EQ(p.message, "JSON parse error, unexpected character at offset 7");
  p = ParseWrite("{\"a\":\xc3\xa9}");
  EXPECT_EQ(p.error, EINVAL);
  EXPECT_NE(p.message.find(" at offset 5"), std::string::npos) << p.message;
  // A byte-order mark is valid UTF-8 but not JSON.
  EXPECT_EQ(ParseWrite("\xef\xbb\xbf{\"a\":1}").error, EINVAL);
  p = ParseWrite("{\"a\":\"\xc3\xa9\xe2\x82\xac\xf0\x9f\x98\x80\"}");
  EXPECT_EQ(p.error, 0) << p.message;
  EXPECT_EQ(p.commands[0]["a"], "\xc3\xa9\xe2\x82\xac\xf0\x9f\x98\x80");
}

// Issue 12: syntax errors said "at offset 0" whatever the byte; they name the
// byte of the write now, also in a later object of the same write.
TEST(ParseWrite, SyntaxErrorsNameTheirByte) {
  const std::pair<std::string, std::string> cases[] = {
      {"{]", "JSON parse error, unexpected ']'; expected string literal at offset 1"},
      {R"({"execute": "query-jobs",})",
       "JSON parse error, unexpected '}'; expected string literal at offset 25"},
      {R"({"a": tru})", "JSON parse error, invalid literal at offset 9"},
      {R"(  {"a": 1}  {"execute": 'x'})", "JSON parse error, invalid literal at offset 24"},
      {"{\"a\":1}\n{\"b\" 2}",
       "JSON parse error, unexpected number literal; expected ':' at offset 13"},
  };
  for (const auto& [text, message] : cases) {
    ParsedWrite p = ParseWrite(text);
    EXPECT_EQ(p.error, EINVAL) << text;
    EXPECT_EQ(p.message, message) << text;
    EXPECT_TRUE(p.commands.empty()) << text;
  }
  ParsedWrite p = ParseWrite(R"({"a": 1} {"b": 1e400})");
  EXPECT_EQ(p.error, EINVAL);
  EXPECT_EQ(p.message, "JSON parse error, number out of range in the object at offset 9");
}

std::string Nest(int depth) {
  std::string s = "{\"a\":";
  for (int i = 1; i < depth; ++i) s += "[";
  s += "1";
  for (int i = 1; i < depth; ++i) s += "]";
  return s + "}";
}

TEST(ParseWrite, NestingIsCapped) {
  EXPECT_EQ(ParseWrite(Nest(kMaxNestingDepth)).error, 0);
  ParsedWrite p = ParseWrite(Nest(kMaxNestingDepth + 1));
  EXPECT_EQ(p.error, EINVAL);
  EXPECT_NE(p.message.find("nesting deeper than 64 levels"), std::string::npos) << p.message;
}

TEST(ParseWrite, DepthBombIsRefusedQuickly) {
  // A megabyte of '[' must neither recurse nor hit the size limit first.
  std::string bomb = "{\"a\":" + std::string(1 << 20, '[');
  ParsedWrite p = ParseWrite(bomb);
  EXPECT_EQ(p.error, EINVAL);
  std::string objects = "{\"a\":";
  for (int i = 0; i < 100000; ++i) objects += "{\"a\":";
  EXPECT_EQ(ParseWrite(objects).error, EINVAL);
}

TEST(ParseWrite, CommandSizeLimit) {
  // Exactly 64 KiB from '{' to '}' is accepted; one byte more is EMSGSIZE.
  const std::string head = R"({"execute": "query-jobs", "id": ")";
  std::string ok = head + std::string(kMaxCommandBytes - head.size() - 2, 'x') + "\"}";
  ASSERT_EQ(ok.size(), kMaxCommandBytes);
  ParsedWrite p = ParseWrite("  " + ok + "\n");
  EXPECT_EQ(p.error, 0) << p.message;
  std::string big = head + std::string(kMaxCommandBytes - head.size() - 1, 'x') + "\"}";
  p = ParseWrite(big);
  EXPECT_EQ(p.error, EMSGSIZE);
  EXPECT_EQ(p.message, "Command at offset 0 exceeds 65536 bytes");
  // Unfinished and over the limit: the size wins, as it is found first.
  EXPECT_EQ(ParseWrite(big.substr(0, big.size() - 2) + "xx").error, EMSGSIZE);
  // Many commands each under the limit are fine however long the write.
  std::string many;
  for (int i = 0; i < 3; ++i) many += ok;
  EXPECT_EQ(ParseWrite(many).error, 0);
}

TEST(ParseWrite, HugeNumbers) {
  ParsedWrite p = ParseWrite(R"({"a": 99999999999999999999, "b": 9223372036854775808})");
  ASSERT_EQ(p.error, 0) << p.message;
  EXPECT_TRUE(p.commands[0]["a"].is_number_float());
  EXPECT_TRUE(p.commands[0]["b"].is_number_unsigned());
  // Beyond double range nlohmann refuses the number: the write is not JSON
  // we can represent.
  EXPECT_EQ(ParseWrite(R"({"a": 1e400})").error, EINVAL);
  EXPECT_EQ(ParseWrite("{\"a\": 1" + std::string(5000, '0') + "}").error, EINVAL);
}

TEST(ParseWrite, TenThousandCommands) {
  std::string text;
  for (int i = 0; i < 10000; ++i)
    text += R"({"execute":"query-jobs","id":)" + std::to_string(i) + "}";
  auto start = std::chrono::steady_clock::now();
  ParsedWrite p = ParseWrite(text);
  ASSERT_EQ(p.error, 0);
  EXPECT_EQ(p.commands.size(), 10000u);
  EXPECT_EQ(p.commands[9999]["id"], 9999);
  EXPECT_LT(std::chrono::steady_clock::now() - start, std::chrono::seconds(5));
}

TEST(ParseWrite, KeepsKeyOrder) {
  ParsedWrite p = ParseWrite(R"({"id": {"z": 1, "a": 2}, "execute": "x"})");
  ASSERT_EQ(p.error, 0);
  EXPECT_EQ(ToQmpText(p.commands[0]), R"({"id": {"z": 1, "a": 2}, "execute": "x"})");
}

TEST(ToQmpText, QemuSpacing) {
  ordered_json j = ordered_json::parse(
      R"({"return": {}, "list": [], "a": [1, "x", null, true, 1.5, {"k": -3}], "s": "q\"\n"})");
  EXPECT_EQ(
      ToQmpText(j),
      R"({"return": {}, "list": [], "a": [1, "x", null, true, 1.5, {"k": -3}], "s": "q\"\n"})");
}

TEST(ToQmpText, InvalidUtf8IsReplaced) {
  ordered_json j;
  j["file"] = std::string("/img/\xff.raw");
  EXPECT_EQ(ToQmpText(j), "{\"file\": \"/img/\xef\xbf\xbd.raw\"}");
}

}  // namespace
}  // namespace cbw::control
