// `ringxfer serve` as a background process on a free port, for the CLI
// tests (test/tools/test_faults.cpp, test_access_cli.cpp), and a raw
// blocking TCP peer to play against it. Needs RINGXFER_EXE (meson test).
#pragma once

#include <boost/test/unit_test.hpp>

#include <sys/socket.h>

#include <cerrno>
#include <chrono>
#include <csignal>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <string>
#include <thread>
#include <vector>

#include "cli_runner.hpp"
#include "ringxfer/engine/socket.hpp"

namespace rxtest {

/// Polls `done` until it holds or `limit` passes.
template <typename Pred>
bool eventually(Pred done, std::chrono::milliseconds limit = std::chrono::seconds(10)) {
    auto deadline = std::chrono::steady_clock::now() + limit;
    while (!done()) {
        if (std::chrono::steady_clock::now() > deadline) return false;
        std::this_thread::sleep_for(std::chrono::milliseconds(20));
    }
    return true;
}

/// `ringxfer serve --listen HOST:0 EXTRA...` (default host 127.0.0.1); the
/// port it bound is read from its "listening on" line.
class Serve {
public:
    struct Status {
        std::size_t open = SIZE_MAX, leased = SIZE_MAX, leased_bytes = SIZE_MAX;
    };

    explicit Serve(std::vector<std::string> extra = {}, const std::string& host = "127.0.0.1")
        : proc_(argv(extra, host), "serve") {
        std::string err = proc_.wait_for("listening on ");
        std::string line = err.substr(err.find("listening on ") + 13);
        line = line.substr(0, line.find(' '));  // "127.0.0.1:PORT" or "[::]:PORT"
        port = static_cast<std::uint16_t>(std::stoi(line.substr(line.rfind(':') + 1)));
    }
    pid_t pid() const { return proc_.pid(); }
    std::string log() const { return proc_.err(); }
    std::string address() const { return "127.0.0.1:" + std::to_string(port); }
    /// Waits until the log has `needle` (after `from`); fails the test if not.
    std::string wait_for(const std::string& needle, std::size_t from = 0) const {
        return proc_.wait_for(needle, true, from);
    }

    /// SIGUSR1: the server prints open connections and leased buffers.
    Status status() {
        std::size_t from = proc_.err().size();
        ::kill(proc_.pid(), SIGUSR1);
        std::string err = proc_.wait_for("status:", true, from);
        Status s;
        std::sscanf(err.c_str() + err.find("status:", from),
                    "status: %zu connections open, %zu buffers leased (%zu bytes)", &s.open,
                    &s.leased, &s.leased_bytes);
        return s;
    }
    /// Waits until the server has `open` connections and, with none, every
    /// buffer back (the cancelled receives of dropped connections return
    /// theirs a loop turn after the drop). A leak shows as a failure here.
    Status settled(std::size_t open = 0) {
        Status s;
        BOOST_TEST(eventually([&] {
                       s = status();
                       return s.open == open && (open > 0 || s.leased == 0);
                   }),
                   "server has " << s.open << " connections open (want " << open << ") and "
                                 << s.leased << " buffers leased");
        return s;
    }
    int stop() { return proc_.stop(SIGTERM); }

    std::uint16_t port = 0;

private:
    static std::vector<std::string> argv(const std::vector<std::string>& extra,
                                         const std::string& host) {
        std::string listen = host.find(':') != std::string::npos ? "[" + host + "]:0" : host + ":0";
        std::vector<std::string> a = {env_or_fail("RINGXFER_EXE"), "serve", "--listen", listen};
        a.insert(a.end(), extra.begin(), extra.end());
        return a;
    }
    Background proc_;
};

/// A raw blocking TCP connection to HOST:port (default 127.0.0.1).
inline ringxfer::engine::Fd raw_connect(std::uint16_t port, const std::string& host = "127.0.0.1") {
    ringxfer::engine::Endpoint ep;
    ep.host = host;
    ep.port = port;
    ringxfer::engine::SockAddr a = ringxfer::engine::resolve(ep);
    ringxfer::engine::Fd fd(::socket(a.family(), SOCK_STREAM | SOCK_CLOEXEC, 0));
    BOOST_REQUIRE(fd);
    BOOST_REQUIRE_MESSAGE(::connect(fd.get(), a.get(), a.len) == 0, std::strerror(errno));
    return fd;
}

}  // namespace rxtest
