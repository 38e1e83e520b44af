// deny_io_uring: runs a command under a seccomp filter that makes
// io_uring_setup, io_uring_enter and io_uring_register fail with EPERM, the
// way Docker's default profile does. Used by the backend-fallback tests.
//
//   deny_io_uring COMMAND [ARGS...]
#include <seccomp.h>
#include <unistd.h>

#include <cerrno>
#include <cstdio>
#include <cstring>
#include <initializer_list>

int main(int argc, char** argv) {
    if (argc < 2) {
        std::fprintf(stderr, "usage: deny_io_uring COMMAND [ARGS...]\n");
        return 2;
    }
    scmp_filter_ctx ctx = seccomp_init(SCMP_ACT_ALLOW);
    if (ctx == nullptr) {
        std::fprintf(stderr, "deny_io_uring: seccomp_init failed\n");
        return 2;
    }
    for (const char* name : {"io_uring_setup", "io_uring_enter", "io_uring_register"}) {
        int nr = seccomp_syscall_resolve_name(name);
        if (nr == __NR_SCMP_ERROR || seccomp_rule_add(ctx, SCMP_ACT_ERRNO(EPERM), nr, 0) < 0) {
            std::fprintf(stderr, "deny_io_uring: cannot add a rule for %s\n", name);
            return 2;
        }
    }
    if (int rc = seccomp_load(ctx); rc < 0) {
        std::fprintf(stderr, "deny_io_uring: seccomp_load: %s\n", std::strerror(-rc));
        return 2;
    }
    seccomp_release(ctx);
    ::execvp(argv[1], argv + 1);
    std::fprintf(stderr, "deny_io_uring: cannot run %s: %s\n", argv[1], std::strerror(errno));
    return 127;
}
