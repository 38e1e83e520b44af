// Runs the real `ringxfer` binary as a user would: meson passes its path in
// RINGXFER_EXE and a scratch directory in RINGXFER_TEST_TMPDIR.
#pragma once

#include <boost/test/unit_test.hpp>

#include <fcntl.h>
#include <signal.h>
#include <spawn.h>
#include <sys/wait.h>
#include <unistd.h>

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

/// Spawns RINGXFER_EXE with `args`, stdout/stderr to files. The limit only
/// turns a hang into a failure; nothing asserts on speed.
inline Run run_cli(const std::vector<std::string>& args,
            std::chrono::seconds limit = std::chrono::seconds(60), const std::string& wrapper = "") {
    std::string ringxfer = env_or_fail("RINGXFER_EXE");
    std::string exe = wrapper.empty() ? ringxfer : wrapper;
    std::string out_path = scratch("stdout"), err_path = scratch("stderr");
    std::vector<char*> argv;
    argv.push_back(const_cast<char*>(exe.c_str()));
    if (!wrapper.empty()) argv.push_back(const_cast<char*>(ringxfer.c_str()));
    for (auto& a : args) argv.push_back(const_cast<char*>(a.c_str()));
    argv.push_back(nullptr);

    posix_spawn_file_actions_t fa;
    posix_spawn_file_actions_init(&fa);
    posix_spawn_file_actions_addopen(&fa, 0, "/dev/null", O_RDONLY, 0);
    posix_spawn_file_actions_addopen(&fa, 1, out_path.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0600);
    posix_spawn_file_actions_addopen(&fa, 2, err_path.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0600);
    pid_t pid = -1;
    auto t0 = std::chrono::steady_clock::now();
    int rc = posix_spawn(&pid, exe.c_str(), &fa, nullptr, argv.data(), environ);
    posix_spawn_file_actions_destroy(&fa);
    BOOST_REQUIRE_MESSAGE(rc == 0, "posix_spawn " << exe << ": " << std::strerror(rc));

    Run r;
    int status = 0;
    for (;;) {
        pid_t w = ::waitpid(pid, &status, WNOHANG);
        if (w == pid) break;
        if (std::chrono::steady_clock::now() - t0 > limit) {
            ::kill(pid, SIGKILL);
            ::waitpid(pid, &status, 0);
            status = -1;
            break;
        }
        std::this_thread::sleep_for(std::chrono::milliseconds(10));
    }
    r.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    if (status != -1) r.exit_code = WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
    r.out = slurp(out_path);
    r.err = slurp(err_path);
    ::unlink(out_path.c_str());
    ::unlink(err_path.c_str());
    BOOST_TEST_MESSAGE("ringxfer exited " << r.exit_code << " after " << r.seconds << " s\n"
                                          << "stdout:\n" << r.out << "stderr:\n" << r.err);
    return r;
}

}  // namespace rxtest
