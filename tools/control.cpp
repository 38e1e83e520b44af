#include "control.hpp"

#include <sys/resource.h>

#include <cstring>

namespace ringxfer::tools {

int make_control_frame(engine::BufferPool& pool, const nlohmann::json& j, proto::Frame& out) {
    std::string text = j.dump();
    int ret = proto::Frame::allocate(pool, text.size(), out, proto::kFlagControl);
    if (ret < 0) return ret;
    std::memcpy(out.mutable_payload().data(), text.data(), text.size());
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
