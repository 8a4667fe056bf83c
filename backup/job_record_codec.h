#pragma once

#include <string>
#include <string_view>

#include "backup/job_types.h"
#include "backup/status.h"

namespace cbw::backup {

// The format of the job records a JobStore keeps in --state-dir: a job's
// state to the bytes of its file, and back. The engine does not choose it:
// the daemon hands JobRegistry::Open control/'s codec, which writes what
// jobs/<id> shows (SPEC 4), so users can read records with jq while backup/
// stays free of JSON.
//
// Thread safety: implementations are immutable and their methods callable
// from any thread at once.
class JobRecordCodec {
 public:
  virtual ~JobRecordCodec() = default;

  // The ending of record file names, with its dot (".json"): the record of
  // job `id` is `<id><suffix>`.
  virtual std::string_view FileSuffix() const = 0;
  // The whole content of the record file of `info`.
  virtual std::string Encode(const JobInfo& info) const = 0;
  // A record file's content back. Fails with EINVAL and the reason when it
  // is not a whole record of this format (the store then skips the file).
  // What the format leaves out comes back as JobInfo's defaults, except
  // where an implementation says otherwise.
  virtual Result<JobInfo> Decode(std::string_view bytes) const = 0;
};

}  // namespace cbw::backup
