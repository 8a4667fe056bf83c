// The one QMP id rule (job ids, drive names, record file names): what it
// accepts, and that the C locale has no say in it.

#include "backup/ids.h"

#include <gtest/gtest.h>
#include <locale.h>
#include <stdlib.h>

#include <cctype>
#include <string>

#include "tests/backup/test_util.h"

namespace cbw::backup {
namespace {

bool AsciiIdChar(unsigned char c) {
  return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') || c == '-' ||
         c == '.' || c == '_';
}

TEST(IsValidId, QmpRules) {
  for (const char* ok : {"a", "Z", "drive0", "Job-1.x_y", "z9", "a..b", "a-", "a_.-9"}) {
    EXPECT_TRUE(IsValidId(ok)) << ok;
  }
  for (const char* bad : {"", "1abc", "-a", "_a", ".a", "a/b", "..", "a..b/", "a b", "a\tb", "a\n",
                          "a:b", "a,b", "a=b", "a+b", "a@b"}) {
    EXPECT_FALSE(IsValidId(bad)) << bad;
  }
  EXPECT_FALSE(IsValidId(std::string("a\0b", 3)));
  EXPECT_TRUE(IsValidId(std::string(64, 'a')));
  EXPECT_FALSE(IsValidId(std::string(65, 'a')));
  EXPECT_TRUE(IsValidId("j" + std::string(63, '9')));
}

TEST(IsValidId, NonAsciiLettersAreRefused) {
  // "été", "Ωmega", "jöb", "ｊob" (fullwidth j) in UTF-8, and Latin-1 "\xe9t\xe9".
  for (const char* bad : {"\xc3\xa9t\xc3\xa9", "\xce\xa9mega",
                          "j\xc3\xb6"
                          "b",
                          "\xef\xbd\x8a"
                          "ob",
                          "\xe9t\xe9", "a\xff"}) {
    EXPECT_FALSE(IsValidId(bad)) << bad;
  }
}

// Every byte, first and later, against the ASCII rule.
void ExpectAsciiRuleForEveryByte(const char* locale_name) {
  for (int b = 0; b < 256; ++b) {
    const auto c = static_cast<unsigned char>(b);
    const bool letter = (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z');
    EXPECT_EQ(IsValidId(std::string(1, static_cast<char>(c))), letter)
        << "byte " << b << " first, locale " << locale_name;
    EXPECT_EQ(IsValidId("a" + std::string(1, static_cast<char>(c))), AsciiIdChar(c))
        << "byte " << b << " later, locale " << locale_name;
  }
}

TEST(IsValidId, TheLocaleDoesNotMatter) {
  // A Latin-1 locale, in which isalpha(0xE9 'é') is true: the locale the
  // earlier std::isalpha-based checks would have let through. Built here
  // because a minimal system has none installed (Debian's `locales` has the
  // sources).
  testing::TempDir dir;
  const std::string cmd =
      "localedef -i fr_FR -f ISO-8859-1 '" + dir.path() + "/fr_FR.ISO-8859-1' >/dev/null 2>&1";
  if (system(cmd.c_str()) != 0) GTEST_SKIP() << "localedef cannot build fr_FR.ISO-8859-1";
  setenv("LOCPATH", dir.path().c_str(), 1);
  ASSERT_NE(setlocale(LC_ALL, "fr_FR.ISO-8859-1"), nullptr);
  // The test can fail: in this locale the C classification disagrees.
  EXPECT_TRUE(std::isalpha(0xe9));
  ExpectAsciiRuleForEveryByte("fr_FR.ISO-8859-1");
  setlocale(LC_ALL, "C");
  unsetenv("LOCPATH");
  ASSERT_NE(setlocale(LC_ALL, "C.UTF-8"), nullptr);
  ExpectAsciiRuleForEveryByte("C.UTF-8");
  setlocale(LC_ALL, "C");
  ExpectAsciiRuleForEveryByte("C");
}

}  // namespace
}  // namespace cbw::backup
