#include "ringxfer/engine/error.hpp"

#include <cstring>

namespace ringxfer::engine {

std::string errno_message(const std::string& what, int err) {
    if (err < 0) err = -err;
    return what + ": " + std::strerror(err);
}

}  // namespace ringxfer::engine
