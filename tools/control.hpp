// The bench control channel: JSON objects carried in control frames (header
// flag bit 1) on the test's own connections.
//
//   client -> server  {"type":"hello","protocol":1,"mode":"stream",...}  first frame
//   server -> client  {"type":"hello-ok","protocol":1}  or  {"type":"error","message":...}
//   client -> server  {"type":"mark"}     measurement starts (server snapshots its CPU)
//   client -> server  {"type":"end"}      stream/echo: no more data follows
//   client -> server  {"type":"stop"}     reverse/bidir: stop sending
//   server -> client  {"type":"results","bytes_received":...,"cpu":{...},...}
//
// A connection whose first frame is a data frame gets plain echo, so any
// v1 peer can use `ringxfer serve` without speaking the control channel.
#pragma once

#include <nlohmann/json.hpp>
#include <optional>
#include <string>
#include <string_view>

#include "ringxfer/engine/buffer_pool.hpp"
#include "ringxfer/engine/stream.hpp"
#include "ringxfer/proto/frame.hpp"

namespace ringxfer::tools {

inline constexpr int kControlProtocol = 1;

/// The test a hello asks for (its "mode", bench's --mode).
enum class TestMode { echo, stream, reverse, bidir };

/// "echo", "stream", "reverse", "bidir": the names on the wire and on the
/// command line.
const char* test_mode_name(TestMode m) noexcept;
/// The mode named `name`; false if none.
bool parse_test_mode(std::string_view name, TestMode& out) noexcept;

/// Builds the send of a control frame holding `j` (compact JSON): header
/// inline, payload in a pooled buffer. Control frames go straight to the
/// stream's ordered queue: they are tiny and must not wait behind the
/// writer's bytes-in-flight bound. Returns 0 or -errno.
int make_control_send(engine::BufferPool& pool, const nlohmann::json& j, engine::SendBuffers& out);

/// Parses a control frame's payload; nullopt (with `error` set) when it is
/// not a JSON object with a string "type".
std::optional<nlohmann::json> parse_control(const proto::Frame& frame, std::string& error);

/// user/sys CPU seconds and peak RSS of this process.
struct ProcessUsage {
    double user_s = 0;
    double sys_s = 0;
    std::uint64_t rss_peak_bytes = 0;
    static ProcessUsage now();
};

}  // namespace ringxfer::tools
