#pragma once

#include <optional>
#include <string>
#include <string_view>

#include "backup/job_record_codec.h"
#include "backup/job_types.h"
#include "backup/status.h"

namespace cbw::control {

// The --state-dir record format: a job's record is its jobs/<id> file
// (SPEC 4's object and a newline, exactly RenderJobFile's output), kept as
// `<id>.json`, so `jq . STATE/<id>.json` shows what `cat jobs/<id>` showed.
//
// Decode is strict about what it needs and lenient about the rest: every
// member RenderJobFile always writes must be there with its type and a known
// value ("error" and "result" may be absent: no error, no result yet);
// members it does not know ("type", "ready", and any a later version adds)
// are ignored. Times are RFC 3339 UTC as Rfc3339 writes them (any number of
// fraction digits, 1 to 9, is read). What a jobs/ file does not show comes
// back as: `listed` false (a record from disk is never a QMP job). Rounding
// that jobs/ files do (milliseconds of times, whole bytes/s and ETA seconds)
// is kept, so Encode(Decode(Encode(x))) == Encode(x).
//
// Thread safety: immutable; every method may run on any thread at once.
class JsonJobRecordCodec final : public backup::JobRecordCodec {
 public:
  std::string_view FileSuffix() const override { return ".json"; }
  std::string Encode(const backup::JobInfo& info) const override;
  backup::Result<backup::JobInfo> Decode(std::string_view bytes) const override;
};

// "2026-11-26T14:20:42.123Z" (Rfc3339's output; 0 to 9 fraction digits, 'Z'
// only) to seconds since the epoch; nullopt if malformed or not a real date.
std::optional<double> ParseRfc3339(std::string_view text);

}  // namespace cbw::control
