// QmpSession: QMP's greeting and capability negotiation, as QEMU's monitor
// does them, over the real dispatcher.

#include "control/qmp_session.h"

#include <gtest/gtest.h>

#include <nlohmann/json.hpp>
#include <string>

#include "tests/control/control_env.h"

namespace cbw::control {
namespace {

using nlohmann::json;
using testing::ControlEnv;

json Reply(QmpSession& s, const std::string& text) {
  std::string line = s.Handle(text);
  EXPECT_FALSE(line.empty());
  EXPECT_EQ(line.back(), '\n');
  return json::parse(line);
}

TEST(QmpSessionTest, GreetingCarriesQueryVersionAndNoCapabilities) {
  ControlEnv env;
  QmpSession s(&env.dispatcher());
  std::string g = s.Greeting();
  ASSERT_EQ(g.back(), '\n');
  json greeting = json::parse(g);
  json version = json::parse(env.Run("{\"execute\":\"query-version\"}").responses)["return"];
  EXPECT_EQ(greeting["QMP"]["version"], version);
  EXPECT_EQ(greeting["QMP"]["version"]["package"], "cbwfs " CBWFS_VERSION);
  EXPECT_EQ(greeting["QMP"]["capabilities"], json::array());
  EXPECT_EQ(g.find('\n'), g.size() - 1);  // one line
}

TEST(QmpSessionTest, CommandsBeforeNegotiationAreRefusedAsQemuDoes) {
  ControlEnv env;
  QmpSession s(&env.dispatcher());
  for (const char* cmd : {R"({"execute":"query-block","id":3})", R"({"execute":"nope","id":3})"}) {
    json r = Reply(s, cmd);
    EXPECT_EQ(r["error"]["class"], "CommandNotFound") << cmd;
    EXPECT_EQ(r["error"]["desc"], "Expecting capabilities negotiation with 'qmp_capabilities'");
    EXPECT_EQ(r["id"], 3);
  }
  // Envelope errors keep their own words; nothing ran.
  EXPECT_EQ(Reply(s, R"({"id":1})")["error"]["desc"], "QMP input lacks member 'execute'");
  EXPECT_EQ(Reply(s, R"({"execute":"drive-backup","arguments":{"device":"drive0","target":")" +
                         env.dir() + R"(/t","sync":"full"}})")["error"]["class"],
            "CommandNotFound");
  EXPECT_FALSE(env.FindJob("drive0"));
  // A bad qmp_capabilities does not negotiate.
  EXPECT_EQ(
      Reply(s, R"({"execute":"qmp_capabilities","arguments":{"enable":["oob"]}})")["error"]["desc"],
      "Capability 'oob' not available");
  EXPECT_FALSE(s.negotiated());
  EXPECT_EQ(Reply(s, R"({"execute":"qmp_capabilities","id":"n"})"),
            json::parse(R"({"return": {}, "id": "n"})"));
  EXPECT_TRUE(s.negotiated());
}

TEST(QmpSessionTest, AfterNegotiationEveryCommandRunsAndASecondNegotiationIsIgnored) {
  ControlEnv env;
  QmpSession s(&env.dispatcher());
  Reply(s, R"({"execute":"qmp_capabilities"})");
  json r = Reply(s, R"({"execute":"qmp_capabilities","id":[1]})");
  EXPECT_EQ(r["error"]["class"], "CommandNotFound");
  EXPECT_EQ(r["error"]["desc"], "Capabilities negotiation is already complete, command ignored");
  EXPECT_EQ(r["id"], json::array({1}));
  // Its arguments are still checked first, as QEMU's marshaller does.
  EXPECT_EQ(Reply(s, R"({"execute":"qmp_capabilities","arguments":{"x":1}})")["error"]["desc"],
            "Parameter 'x' is unexpected");
  // The same replies as the control file.
  const std::string query = R"({"execute":"query-block","id":"b"})";
  EXPECT_EQ(s.Handle(query), env.Run(query).responses);
  EXPECT_EQ(Reply(s, R"({"execute":"nope"})")["error"]["desc"],
            "The command nope has not been found");
}

TEST(QmpSessionTest, BadValuesGetTheControlFilesErrors) {
  ControlEnv env;
  QmpSession s(&env.dispatcher());
  EXPECT_EQ(Reply(s, "[1]")["error"]["desc"], "QMP input must be a JSON object");
  EXPECT_EQ(Reply(s, "}")["error"]["class"], "GenericError");
  json big = Reply(s, "{\"execute\":\"" + std::string(70000, 'x'));
  EXPECT_EQ(big["error"]["desc"], "Command at offset 0 exceeds 65536 bytes");
  EXPECT_FALSE(big.contains("id"));
}

}  // namespace
}  // namespace cbw::control
