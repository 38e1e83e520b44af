// main() for the fuzz targets in builds without libFuzzer (the normal gcc
// build): runs every input file named on the command line, or found in a
// directory named there, through LLVMFuzzerTestOneInput once. Meson runs it
// over test/fuzz/corpus/<target>/ on every `meson test`, so the seeds and
// every input that once found a bug keep passing. A target aborts on a
// broken invariant, which fails the test. Finding no input is a failure too:
// a moved or empty corpus must not pass silently.
#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <vector>

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size);

namespace fs = std::filesystem;

namespace {

bool replay(const fs::path& file) {
    std::ifstream f(file, std::ios::binary);
    if (!f) {
        std::fprintf(stderr, "cannot read %s\n", file.c_str());
        return false;
    }
    std::vector<char> bytes{std::istreambuf_iterator<char>(f), std::istreambuf_iterator<char>()};
    std::printf("%s (%zu bytes)\n", file.c_str(), bytes.size());
    std::fflush(stdout);  // names the input if the target aborts
    LLVMFuzzerTestOneInput(reinterpret_cast<const std::uint8_t*>(bytes.data()), bytes.size());
    return true;
}

}  // namespace

int main(int argc, char** argv) {
    std::size_t ran = 0;
    for (int i = 1; i < argc; ++i) {
        fs::path arg = argv[i];
        std::vector<fs::path> files;
        if (fs::is_directory(arg)) {
            for (const auto& e : fs::directory_iterator(arg))
                if (e.is_regular_file()) files.push_back(e.path());
            std::sort(files.begin(), files.end());
        } else {
            files.push_back(arg);
        }
        for (const auto& f : files) {
            if (!replay(f)) return 1;
            ++ran;
        }
    }
    if (ran == 0) {
        std::fprintf(stderr, "no fuzz input found in the arguments\n");
        return 1;
    }
    std::printf("%zu inputs replayed\n", ran);
    return 0;
}
