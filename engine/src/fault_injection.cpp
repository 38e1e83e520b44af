#include "ringxfer/engine/fault_injection.hpp"

#include <sys/socket.h>
#include <sys/uio.h>

#include <algorithm>

namespace ringxfer::engine {
namespace {

bool has_length(int opcode) {
    return opcode == IORING_OP_RECV || opcode == IORING_OP_SEND || opcode == IORING_OP_SEND_ZC ||
           opcode == IORING_OP_READ_FIXED || opcode == IORING_OP_READ ||
           opcode == IORING_OP_WRITE || opcode == IORING_OP_WRITE_FIXED;
}

// Shortens a SENDMSG/RECVMSG's iovecs in place to at most `max` bytes. The
// owner rebuilds its iovecs on every (re)submission, so this is safe.
bool clamp_msg(io_uring_sqe* sqe, std::uint32_t max) {
    auto* msg = reinterpret_cast<msghdr*>(static_cast<std::uintptr_t>(sqe->addr));
    if (msg == nullptr) return false;
    std::size_t left = max;
    bool changed = false;
    for (std::size_t i = 0; i < msg->msg_iovlen; ++i) {
        if (msg->msg_iov[i].iov_len > left) {
            msg->msg_iov[i].iov_len = left;
            changed = true;
        }
        left -= msg->msg_iov[i].iov_len;
        if (left == 0 && i + 1 < msg->msg_iovlen) {
            msg->msg_iovlen = i + 1;
            changed = true;
            break;
        }
    }
    return changed;
}

}  // namespace

void FaultInjector::on_submit(io_uring_sqe* sqe) {
    if (sqe->user_data == 0) return;  // the ring's own fire-and-forget requests
    ++stats_.seen;
    state_.resize(rules_.size());
    for (std::size_t i = 0; i < rules_.size(); ++i) {
        const FaultRule& r = rules_[i];
        State& st = state_[i];
        if (r.opcode != FaultRule::kAnyOp && r.opcode != sqe->opcode) continue;
        if (r.max_bytes != 0 && !has_length(sqe->opcode) && sqe->opcode != IORING_OP_SENDMSG)
            continue;
        std::uint64_t n = st.matched++;
        if (st.hits >= r.count || n < r.skip || (n - r.skip) % std::max<std::uint64_t>(r.every, 1))
            continue;
        ++st.hits;
        if (r.error != 0) {
            std::uint64_t ud = sqe->user_data;
            io_uring_prep_nop(sqe);
            sqe->user_data = ud;
            pending_.emplace(ud, r.error);
            ++stats_.errors;
            return;
        }
        if (sqe->opcode == IORING_OP_SENDMSG) {
            if (clamp_msg(sqe, r.max_bytes)) ++stats_.shortened;
        } else if (sqe->len > r.max_bytes) {
            sqe->len = r.max_bytes;
            ++stats_.shortened;
        }
        return;
    }
}

std::int32_t FaultInjector::on_complete(std::uint64_t user_data, std::int32_t res,
                                        std::uint32_t flags) {
    if (pending_.empty() || (flags & IORING_CQE_F_NOTIF)) return res;
    auto it = pending_.find(user_data);
    if (it == pending_.end()) return res;
    std::int32_t err = it->second;
    pending_.erase(it);
    return err;
}

}  // namespace ringxfer::engine
