// Error conventions.
//
// Inside the engine every fallible call returns an int: >= 0 on success,
// -errno on failure (the liburing convention; errno itself is never relied
// upon across calls). At the public edge those become std::error_code values
// in std::system_category(), or an Error exception for set-up failures that a
// user has to act on (the message says what happened and what to do).
#pragma once

#include <stdexcept>
#include <string>
#include <system_error>

namespace ringxfer::engine {

/// Set-up failure with an actionable message (io_uring unavailable, bad
/// address, cannot listen, ...). `code()` is the underlying errno (positive).
class Error : public std::runtime_error {
public:
    Error(int err, const std::string& message) : std::runtime_error(message), err_(err) {}
    int code() const noexcept { return err_; }

private:
    int err_;
};

/// std::error_code for a negative errno result.
inline std::error_code errno_code(int neg_errno) noexcept {
    return {neg_errno < 0 ? -neg_errno : neg_errno, std::system_category()};
}

/// "what: strerror(err)" for a positive or negative errno.
std::string errno_message(const std::string& what, int err);

}  // namespace ringxfer::engine
