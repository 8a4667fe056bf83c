// JsonFramer: a QMP byte stream cut into top-level JSON values.

#include "qmp/framer.h"

#include <gtest/gtest.h>

#include <string>
#include <vector>

namespace cbw::qmp {
namespace {

std::vector<std::string> Frame(const std::vector<std::string>& chunks, size_t max = 1 << 16) {
  JsonFramer f(max);
  std::vector<std::string> out;
  for (const auto& c : chunks) f.Feed(c, &out);
  return out;
}

TEST(JsonFramerTest, ObjectsBackToBackWithOrWithoutNewlines) {
  EXPECT_EQ(Frame({"{\"a\":1}{\"b\":2}\n  {\"c\":3}\r\n"}),
            (std::vector<std::string>{"{\"a\":1}", "{\"b\":2}", "{\"c\":3}"}));
}

TEST(JsonFramerTest, ValuesSplitAcrossReadsAtEveryByte) {
  const std::string stream = R"({"execute":"x","arguments":{"s":"a}\"{["}} [1,[2]] "q\"}" tru)";
  std::vector<std::string> chunks;
  for (char c : stream + " ") chunks.push_back(std::string(1, c));
  EXPECT_EQ(Frame(chunks),
            (std::vector<std::string>{R"({"execute":"x","arguments":{"s":"a}\"{["}})", "[1,[2]]",
                                      R"("q\"}")", "tru"}));
}

TEST(JsonFramerTest, BracesInsideStringsAndEscapesDoNotEndAValue) {
  EXPECT_EQ(Frame({R"({"k":"}\\"}{"k":"\\\""})"}),
            (std::vector<std::string>{R"({"k":"}\\"})", R"({"k":"\\\""})"}));
}

TEST(JsonFramerTest, StrayCharactersAndScalarsAreValuesOfTheirOwn) {
  EXPECT_EQ(Frame({"} 12{\"a\":1}x:"}),
            (std::vector<std::string>{"}", "12", "{\"a\":1}", "x", ":"}));
}

TEST(JsonFramerTest, AnUnfinishedValueWaitsForMore) {
  JsonFramer f(1 << 16);
  std::vector<std::string> out;
  f.Feed("{\"a\": [1, 2", &out);
  EXPECT_TRUE(out.empty());
  f.Feed("]}", &out);
  EXPECT_EQ(out, (std::vector<std::string>{"{\"a\": [1, 2]}"}));
}

TEST(JsonFramerTest, AnOversizedValueKeepsOnlyOneByteMoreThanTheLimit) {
  std::string big = "{\"k\":\"" + std::string(1000, 'x') + "\"}";
  auto out = Frame({big, "{}"}, 100);
  ASSERT_EQ(out.size(), 2u);
  EXPECT_EQ(out[0], big.substr(0, 101));
  EXPECT_EQ(out[1], "{}");
}

}  // namespace
}  // namespace cbw::qmp
