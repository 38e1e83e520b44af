#include "units.hpp"

#include <cmath>
#include <cstdio>
#include <string>

namespace ringxfer::tools {

std::optional<std::uint64_t> parse_size(std::string_view text) {
    std::size_t i = 0;
    while (i < text.size() && (std::isdigit(static_cast<unsigned char>(text[i])) || text[i] == '.'))
        ++i;
    if (i == 0) return std::nullopt;
    std::string number(text.substr(0, i));
    std::string_view unit = text.substr(i);
    if (unit.ends_with('B') || unit.ends_with('b')) unit.remove_suffix(1);
    double mult = 1;
    if (unit.empty()) mult = 1;
    else if (unit == "K" || unit == "k") mult = 1e3;
    else if (unit == "M" || unit == "m") mult = 1e6;
    else if (unit == "G" || unit == "g") mult = 1e9;
    else if (unit == "Ki" || unit == "ki") mult = 1024.0;
    else if (unit == "Mi" || unit == "mi") mult = 1024.0 * 1024;
    else if (unit == "Gi" || unit == "gi") mult = 1024.0 * 1024 * 1024;
    else return std::nullopt;
    char* end = nullptr;
    double v = std::strtod(number.c_str(), &end);
    if (end != number.c_str() + number.size() || !(v >= 0)) return std::nullopt;
    double bytes = std::round(v * mult);
    if (bytes > 1.8e19) return std::nullopt;
    return static_cast<std::uint64_t>(bytes);
}

std::string format_bytes(std::uint64_t bytes) {
    char buf[64];
    double b = static_cast<double>(bytes);
    if (bytes >= 1000000000ull) std::snprintf(buf, sizeof buf, "%.2f GB", b / 1e9);
    else if (bytes >= 1000000ull) std::snprintf(buf, sizeof buf, "%.1f MB", b / 1e6);
    else if (bytes >= 1000ull) std::snprintf(buf, sizeof buf, "%.1f kB", b / 1e3);
    else std::snprintf(buf, sizeof buf, "%llu B", static_cast<unsigned long long>(bytes));
    return buf;
}

}  // namespace ringxfer::tools
