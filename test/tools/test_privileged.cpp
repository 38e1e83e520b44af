// Tests that need root to set up their environment, skipped with a message
// otherwise: bench as an unprivileged user under an 8 MiB RLIMIT_MEMLOCK,
// and serve and bench on two "hosts" (network namespaces joined by a veth
// pair, rate-limited with tbf). meson passes RINGXFER_EXE and
// RINGXFER_TEST_TMPDIR.
#define BOOST_TEST_MODULE tools_privileged
#ifndef BOOST_TEST_DYN_LINK  // meson's boost dependency may define it already
#define BOOST_TEST_DYN_LINK
#endif
#include <boost/test/unit_test.hpp>

#include <sys/stat.h>

#include <filesystem>
#include <string>
#include <vector>

#include "cli_runner.hpp"

namespace {

namespace fs = std::filesystem;
namespace utf = boost::unit_test;
using namespace std::chrono_literals;

/// The first directory of PATH-like lookup that has `name`, or "".
std::string which(const std::string& name) {
    for (const char* dir : {"/usr/sbin", "/usr/bin", "/sbin", "/bin"}) {
        std::string p = std::string(dir) + "/" + name;
        if (::access(p.c_str(), X_OK) == 0) return p;
    }
    return "";
}

/// Precondition: root, and every tool in `tools` installed.
struct NeedsRoot {
    std::vector<std::string> tools;
    boost::test_tools::assertion_result operator()(utf::test_unit_id) const {
        boost::test_tools::assertion_result r(true);
        if (::geteuid() != 0) {
            r = false;
            r.message() << "needs root (runs as uid " << ::geteuid() << ")";
            return r;
        }
        for (auto& t : tools)
            if (which(t).empty()) {
                r = false;
                r.message() << "'" << t << "' is not installed";
                return r;
            }
        return r;
    }
};

/// Runs a command (no shell); returns exit code and stdout+stderr.
std::pair<int, std::string> run(const std::vector<std::string>& argv,
                                std::chrono::milliseconds limit = 20s) {
    std::string out = rxtest::scratch("cmd-out"), err = rxtest::scratch("cmd-err");
    int code = rxtest::wait_bounded(rxtest::spawn_to_files(argv, out, err), limit);
    std::string text = rxtest::slurp(out) + rxtest::slurp(err);
    ::unlink(out.c_str());
    ::unlink(err.c_str());
    return {code, text};
}

void must(const std::vector<std::string>& argv) {
    auto [code, text] = run(argv);
    std::string line;
    for (auto& a : argv) line += a + " ";
    BOOST_REQUIRE_MESSAGE(code == 0, line << "failed (" << code << "): " << text);
}

std::size_t count(const std::string& text, const std::string& needle) {
    std::size_t n = 0;
    for (auto pos = text.find(needle); pos != std::string::npos; pos = text.find(needle, pos + 1))
        ++n;
    return n;
}

/// A copy of the ringxfer binary (and its library, which it finds at
/// $ORIGIN/..) in a fresh 0755 directory under /tmp: the build directory
/// may not be reachable by an unprivileged user.
class PublicCopy {
public:
    PublicCopy() {
        char tmpl[] = "/tmp/ringxfer-nobody-XXXXXX";
        BOOST_REQUIRE(::mkdtemp(tmpl));
        root_ = tmpl;
        fs::path exe = rxtest::env_or_fail("RINGXFER_EXE");
        fs::create_directory(root_ / "tools");
        fs::copy_file(exe, root_ / "tools" / "ringxfer");
        for (auto& e : fs::directory_iterator(exe.parent_path().parent_path()))
            if (e.path().filename().string().rfind("libringxfer.so", 0) == 0)
                fs::copy(e.path(), root_ / e.path().filename(), fs::copy_options::copy_symlinks);
        for (const fs::path& p : {root_, root_ / "tools"}) ::chmod(p.c_str(), 0755);
    }
    ~PublicCopy() {
        std::error_code ec;
        fs::remove_all(root_, ec);
    }
    std::string exe() const { return (root_ / "tools" / "ringxfer").string(); }

private:
    fs::path root_;
};

/// Two network namespaces joined by a veth pair, removed (with the pair) on
/// destruction, failure included. Names are unique per run.
class TwoHosts {
public:
    TwoHosts() {
        std::string id = std::to_string(::getpid());
        a = "rxA" + id;
        b = "rxB" + id;
        dev_a = "rxa" + id;
        dev_b = "rxb" + id;
        must({"ip", "netns", "add", a});
        created_a_ = true;
        must({"ip", "netns", "add", b});
        created_b_ = true;
        must({"ip", "link", "add", dev_a, "type", "veth", "peer", "name", dev_b});
        must({"ip", "link", "set", dev_a, "netns", a});
        must({"ip", "link", "set", dev_b, "netns", b});
        must({"ip", "-n", a, "addr", "add", addr_a + "/24", "dev", dev_a});
        must({"ip", "-n", b, "addr", "add", addr_b + "/24", "dev", dev_b});
        for (auto [ns, dev] : {std::pair{a, dev_a}, std::pair{b, dev_b}}) {
            must({"ip", "-n", ns, "link", "set", "lo", "up"});
            must({"ip", "-n", ns, "link", "set", dev, "up"});
        }
    }
    ~TwoHosts() {
        // Deleting a namespace deletes the veth end in it, and so the pair.
        if (created_a_) run({"ip", "netns", "del", a});
        if (created_b_) run({"ip", "netns", "del", b});
        if (!created_a_) run({"ip", "link", "del", dev_a});
    }
    /// argv prefix that runs a command inside namespace `ns`.
    static std::vector<std::string> in(const std::string& ns) { return {"ip", "netns", "exec", ns}; }

    std::string a, b, dev_a, dev_b;
    const std::string addr_a = "10.77.0.1", addr_b = "10.77.0.2";

private:
    bool created_a_ = false, created_b_ = false;
};

}  // namespace

// Registered buffers count against RLIMIT_MEMLOCK; an ordinary user's 8 MiB
// cannot hold 10 MB frames. The transfer must complete unregistered, each
// process saying so once with the limit. bench with no address forks its own
// server: two processes, two lines. Then serve and bench as separate
// processes: one line each.
BOOST_TEST_DECORATOR(*utf::precondition(NeedsRoot{{"setpriv", "prlimit"}}))
BOOST_AUTO_TEST_CASE(bench_as_nobody_under_an_8_mib_memlock_limit_warns_once_per_process) {
    PublicCopy copy;
    const std::vector<std::string> as_nobody = {"--reuid=nobody", "--regid=nogroup",
                                                "--clear-groups", "prlimit",
                                                "--memlock=8388608:8388608"};
    const std::string setpriv = which("setpriv");
    const std::string warning = "RLIMIT_MEMLOCK is 8.0 MiB";

    rxtest::Run r = rxtest::run_cli({"bench", "--frame-size", "10M", "--frames", "3", "--verify"},
                                    60s, setpriv, as_nobody, copy.exe());
    BOOST_TEST(r.exit_code == 0, r.err);
    BOOST_TEST(r.err.find("echo 3 frames") != std::string::npos);
    BOOST_TEST(count(r.err, warning) == 2u, "want one warning per process (bench and its server)");
    BOOST_TEST(count(r.err, "RLIMIT_MEMLOCK") == 2u);

    std::vector<std::string> serve = {setpriv};
    serve.insert(serve.end(), as_nobody.begin(), as_nobody.end());
    for (std::string a : {copy.exe(), std::string("serve"), std::string("--listen"),
                          std::string("127.0.0.1:0")})
        serve.push_back(a);
    rxtest::Background server(serve, "serve-nobody");
    std::string log = server.wait_for("listening on 127.0.0.1:");
    std::string port = log.substr(log.find("127.0.0.1:") + 10);
    port = port.substr(0, port.find(' '));
    rxtest::Run c = rxtest::run_cli({"bench", "127.0.0.1:" + port, "--frame-size", "10M",
                                     "--frames", "3", "--verify"},
                                    60s, setpriv, as_nobody, copy.exe());
    BOOST_TEST(c.exit_code == 0, c.err);
    BOOST_TEST(count(c.err, warning) == 1u, c.err);
    BOOST_TEST(server.stop(SIGTERM) == 0);
    BOOST_TEST(count(server.err(), warning) == 1u, server.err());
    BOOST_TEST(server.err().find("0 errors") != std::string::npos, server.err());
}

// Two hosts: serve in one network namespace, bench --verify in the other,
// over a veth pair whose server side is rate-limited by tbf, echo and
// stream. The traffic really crossed the shaped link (tc's byte counter).
BOOST_TEST_DECORATOR(*utf::precondition(NeedsRoot{{"ip", "tc"}}))
BOOST_AUTO_TEST_CASE(serve_and_bench_on_two_hosts_joined_by_a_rate_limited_veth) {
    TwoHosts hosts;
    std::vector<std::string> tbf = TwoHosts::in(hosts.a);
    for (std::string a : {"tc", "qdisc", "add", "dev", "", "root", "tbf", "rate", "400mbit",
                          "burst", "256kb", "latency", "50ms"})
        tbf.push_back(a.empty() ? hosts.dev_a : a);
    must(tbf);

    std::vector<std::string> serve = TwoHosts::in(hosts.a);
    for (std::string a : {rxtest::env_or_fail("RINGXFER_EXE"), std::string("serve"),
                          std::string("--listen"), hosts.addr_a + ":7878"})
        serve.push_back(a);
    {
        rxtest::Background server(serve, "serve-ns");
        server.wait_for("listening on");
        const std::string ip = which("ip");
        const std::vector<std::string> in_b = {"netns", "exec", hosts.b};
        for (std::string mode : {"echo", "stream"}) {
            BOOST_TEST_CONTEXT(mode) {
                rxtest::Run r = rxtest::run_cli({"bench", hosts.addr_a + ":7878", "--mode", mode,
                                                 "--frame-size", "4M", "--frames", "3", "--verify",
                                                 "--quiet"},
                                                60s, ip, in_b);
                BOOST_TEST(r.exit_code == 0, r.err);
                BOOST_TEST(r.err.find(mode + " 3 frames") != std::string::npos, r.err);
            }
        }
        BOOST_TEST(server.stop(SIGTERM) == 0);
        BOOST_TEST(server.err().find("0 errors") != std::string::npos, server.err());
    }
    // Server to client: 4 echoes of 4 MB (warm-up included) at least.
    auto [code, stats] = run({"ip", "netns", "exec", hosts.a, "tc", "-s", "qdisc", "show", "dev",
                              hosts.dev_a});
    BOOST_REQUIRE(code == 0);
    auto sent = stats.find("Sent ", stats.find("tbf"));  // (std::regex trips GCC 12 -Werror)
    BOOST_REQUIRE_MESSAGE(stats.find("tbf") != std::string::npos && sent != std::string::npos,
                          stats);
    BOOST_TEST(std::stoull(stats.substr(sent + 5)) >= 16'000'000u, stats);
}
