// Size and rate units of the CLI: sizes take K/M/G (10^3) and Ki/Mi/Gi (2^10)
// suffixes, optionally followed by "B"; rates are reported in MB/s with
// 1 MB = 10^6 bytes.
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <string_view>

namespace ringxfer::tools {

/// Parses "100M", "64Ki", "4096", "1.5G". Returns nullopt on garbage or
/// overflow.
std::optional<std::uint64_t> parse_size(std::string_view text);

/// "100.0 MB", "64.0 KiB"-style rendering for humans (decimal units).
std::string format_bytes(std::uint64_t bytes);

}  // namespace ringxfer::tools
