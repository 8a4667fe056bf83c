#include <gtest/gtest.h>
TEST(StressTest, Placeholder) {}
