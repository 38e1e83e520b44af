// Runs the real `ringxfer` binary as a user would: meson passes its path in
// RINGXFER_EXE and a scratch directory in RINGXFER_TEST_TMPDIR.
#pragma once

#include <boost/test/unit_test.hpp>

#include <fcntl.h>
#include <signal.h>
#include <spawn.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cerrno>
#include <chrono>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

extern char** environ;

namespace rxtest {

inline std::string env_or_fail(const char* name) {
    const char* v = std::getenv(name);
    BOOST_REQUIRE_MESSAGE(v && *v, name << " is not set (run through meson test)");
    return v;
}

inline std::string scratch(const std::string& name) {
    const char* dir = std::getenv("RINGXFER_TEST_TMPDIR");
    std::string base = dir && *dir ? dir : "/tmp";
    return base + "/cli-" + std::to_string(::getpid()) + "-" + name;
}

/// Writes `content` to scratch(name), replacing it, with `mode` exactly
/// (no umask); returns the path.
inline std::string scratch_file(const std::string& name, const std::string& content,
                                mode_t mode = 0600) {
    std::string path = scratch(name);
    ::unlink(path.c_str());
    int fd = ::open(path.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0600);
    BOOST_REQUIRE_MESSAGE(fd >= 0, path << ": " << std::strerror(errno));
    BOOST_REQUIRE(::write(fd, content.data(), content.size()) ==
                  static_cast<ssize_t>(content.size()));
    BOOST_REQUIRE(::fchmod(fd, mode) == 0);
    ::close(fd);
    return path;
}

inline std::string slurp(const std::string& path) {
    std::ifstream in(path);
    std::stringstream ss;
    ss << in.rdbuf();
    return ss.str();
}

struct Run {
    int exit_code = -1;  ///< -1: killed by the safety limit
    std::string out, err;
    double seconds = 0;
};

/// posix_spawnp of `argv` (argv[0] is the program, searched in PATH without
/// a slash), stdin from /dev/null,
/// stdout/stderr to the given files. Fails the test if it cannot start.
inline pid_t spawn_to_files(const std::vector<std::string>& args, const std::string& out_path,
                            const std::string& err_path) {
    std::vector<char*> argv;
    for (auto& a : args) argv.push_back(const_cast<char*>(a.c_str()));
    argv.push_back(nullptr);
    posix_spawn_file_actions_t fa;
    posix_spawn_file_actions_init(&fa);
    posix_spawn_file_actions_addopen(&fa, 0, "/dev/null", O_RDONLY, 0);
    posix_spawn_file_actions_addopen(&fa, 1, out_path.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0600);
    posix_spawn_file_actions_addopen(&fa, 2, err_path.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0600);
    pid_t pid = -1;
    int rc = posix_spawnp(&pid, args[0].c_str(), &fa, nullptr, argv.data(), environ);
    posix_spawn_file_actions_destroy(&fa);
    BOOST_REQUIRE_MESSAGE(rc == 0, "posix_spawn " << args[0] << ": " << std::strerror(rc));
    return pid;
}

/// Waits for `pid` at most `limit`, then SIGKILLs it. Returns the exit code,
/// 128 + signal, or -1 when the limit killed it.
inline int wait_bounded(pid_t pid, std::chrono::milliseconds limit) {
    auto t0 = std::chrono::steady_clock::now();
    int status = 0;
    for (;;) {
        pid_t w = ::waitpid(pid, &status, WNOHANG);
        if (w == pid) return WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
        if (w < 0) return -1;
        if (std::chrono::steady_clock::now() - t0 > limit) {
            ::kill(pid, SIGKILL);
            ::waitpid(pid, &status, 0);
            return -1;
        }
        std::this_thread::sleep_for(std::chrono::milliseconds(5));
    }
}

/// Spawns RINGXFER_EXE with `args`, stdout/stderr to files. The limit only
/// turns a hang into a failure; nothing asserts on speed. `wrapper` (and
/// `wrapper_args`) run in front of it, e.g. a seccomp filter or setpriv.
inline Run run_cli(const std::vector<std::string>& args,
                   std::chrono::seconds limit = std::chrono::seconds(60),
                   const std::string& wrapper = "",
                   const std::vector<std::string>& wrapper_args = {},
                   const std::string& ringxfer_exe = "") {
    std::string ringxfer = ringxfer_exe.empty() ? env_or_fail("RINGXFER_EXE") : ringxfer_exe;
    std::string out_path = scratch("stdout"), err_path = scratch("stderr");
    std::vector<std::string> argv;
    if (!wrapper.empty()) argv.push_back(wrapper);
    argv.insert(argv.end(), wrapper_args.begin(), wrapper_args.end());
    argv.push_back(ringxfer);
    argv.insert(argv.end(), args.begin(), args.end());

    auto t0 = std::chrono::steady_clock::now();
    pid_t pid = spawn_to_files(argv, out_path, err_path);
    Run r;
    r.exit_code = wait_bounded(pid, limit);
    r.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    r.out = slurp(out_path);
    r.err = slurp(err_path);
    ::unlink(out_path.c_str());
    ::unlink(err_path.c_str());
    BOOST_TEST_MESSAGE("ringxfer exited " << r.exit_code << " after " << r.seconds << " s\n"
                                          << "stdout:\n" << r.out << "stderr:\n" << r.err);
    return r;
}

/// A long-running child (`ringxfer serve`, the fault proxy): its output goes
/// to files that can be read while it runs; stop() signals it and reaps it.
/// The destructor kills it if the test did not stop it.
class Background {
public:
    Background(std::vector<std::string> argv, const std::string& name)
        : name_(name), out_path_(scratch(name + "-out")), err_path_(scratch(name + "-err")) {
        pid_ = spawn_to_files(argv, out_path_, err_path_);
    }
    ~Background() {
        if (pid_ > 0) wait_bounded_kill();
        ::unlink(out_path_.c_str());
        ::unlink(err_path_.c_str());
    }
    Background(const Background&) = delete;
    Background& operator=(const Background&) = delete;

    pid_t pid() const { return pid_; }
    std::string out() const { return slurp(out_path_); }
    std::string err() const { return slurp(err_path_); }

    /// Waits (at most `limit`) until stdout or stderr contains `needle`
    /// after position `from`; returns that text. Fails the test otherwise.
    std::string wait_for(const std::string& needle, bool on_stderr = true, std::size_t from = 0,
                         std::chrono::seconds limit = std::chrono::seconds(20)) const {
        auto deadline = std::chrono::steady_clock::now() + limit;
        for (;;) {
            std::string text = on_stderr ? err() : out();
            if (text.size() > from && text.find(needle, from) != std::string::npos) return text;
            int status = 0;
            BOOST_REQUIRE_MESSAGE(::waitpid(pid_, &status, WNOHANG) == 0,
                                  name_ << " exited before printing '" << needle << "': " << err());
            BOOST_REQUIRE_MESSAGE(std::chrono::steady_clock::now() < deadline,
                                  name_ << " did not print '" << needle << "': " << err());
            std::this_thread::sleep_for(std::chrono::milliseconds(5));
        }
    }

    /// Sends `sig`, waits at most `limit`; returns the exit code (-1: it had
    /// to be killed).
    int stop(int sig = SIGTERM, std::chrono::seconds limit = std::chrono::seconds(20)) {
        if (pid_ <= 0) return -1;
        ::kill(pid_, sig);
        int code = wait_bounded(pid_, limit);
        pid_ = -1;
        BOOST_TEST_MESSAGE(name_ << " exited " << code << "; stderr:\n" << err());
        return code;
    }

private:
    void wait_bounded_kill() {
        ::kill(pid_, SIGKILL);
        wait_bounded(pid_, std::chrono::seconds(5));
        pid_ = -1;
    }
    std::string name_, out_path_, err_path_;
    pid_t pid_ = -1;
};

}  // namespace rxtest
