#include "control.hpp"

#include <sys/resource.h>

#include <cstring>

namespace ringxfer::tools {

const char* test_mode_name(TestMode m) noexcept {
    switch (m) {
        case TestMode::echo: return "echo";
        case TestMode::stream: return "stream";
        case TestMode::reverse: return "reverse";
        case TestMode::bidir: return "bidir";
    }
    return "echo";
}

bool parse_test_mode(std::string_view name, TestMode& out) noexcept {
    for (TestMode m : {TestMode::echo, TestMode::stream, TestMode::reverse, TestMode::bidir}) {
        if (name == test_mode_name(m)) {
            out = m;
            return true;
        }
    }
    return false;
}

int make_control_send(engine::BufferPool& pool, const nlohmann::json& j, engine::SendBuffers& out) {
    std::string text = j.dump();
    engine::Lease body;
    if (int ret = pool.lease(text.size(), body); ret < 0) return ret;
    std::memcpy(body.data(), text.data(), text.size());
    proto::FrameHeader h{proto::kFlagControl, 0, text.size()};
    proto::encode_header(h, std::span<std::byte, proto::kHeaderSize>(out.prefix.data(),
                                                                     proto::kHeaderSize));
    out.prefix_len = proto::kHeaderSize;
    out.body_len = text.size();
    out.body = std::move(body);
    return 0;
}

std::optional<nlohmann::json> parse_control(const proto::Frame& frame, std::string& error) {
    auto p = frame.payload();
    auto j = nlohmann::json::parse(reinterpret_cast<const char*>(p.data()),
                                   reinterpret_cast<const char*>(p.data()) + p.size(), nullptr,
                                   /*allow_exceptions=*/false);
    if (j.is_discarded() || !j.is_object() || !j.contains("type") || !j["type"].is_string()) {
        error = "control frame is not a JSON object with a \"type\"";
        return std::nullopt;
    }
    return j;
}

ProcessUsage ProcessUsage::now() {
    rusage ru{};
    ::getrusage(RUSAGE_SELF, &ru);
    ProcessUsage u;
    u.user_s = static_cast<double>(ru.ru_utime.tv_sec) + ru.ru_utime.tv_usec / 1e6;
    u.sys_s = static_cast<double>(ru.ru_stime.tv_sec) + ru.ru_stime.tv_usec / 1e6;
    u.rss_peak_bytes = static_cast<std::uint64_t>(ru.ru_maxrss) * 1024;
    return u;
}

}  // namespace ringxfer::tools
