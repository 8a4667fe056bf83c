#include "backup/status.h"

#include <cstring>

namespace cbw::backup {

Status Status::FromErrno(int err, std::string_view context) {
  std::string msg(context);
  msg += ": ";
  msg += std::strerror(err);
  return Status(err, std::move(msg));
}

}  // namespace cbw::backup
