// Typed protocol errors. Frame-level failures are std::error_code values in
// proto::category(); transport failures keep std::system_category() errnos.
#pragma once

#include <system_error>

namespace ringxfer::proto {

enum class Errc {
    closed = 1,         ///< peer closed cleanly between frames (not a failure)
    truncated,          ///< peer closed in the middle of a frame
    bad_magic,          ///< first two bytes are not "RX"
    bad_version,        ///< version byte is not 1
    unknown_flags,      ///< reserved flag bits set
    reserved_not_zero,  ///< checksum field set without the checksum flag
    too_large,          ///< length above the receiver's maximum
    checksum_mismatch,  ///< CRC32C of the payload differs from the header
    no_buffer,          ///< the buffer pool could not supply the payload buffer
    too_many_empty,     ///< more consecutive zero-length frames than allowed
};

const std::error_category& category() noexcept;

inline std::error_code make_error_code(Errc e) noexcept {
    return {static_cast<int>(e), category()};
}

}  // namespace ringxfer::proto

template <>
struct std::is_error_code_enum<ringxfer::proto::Errc> : std::true_type {};
