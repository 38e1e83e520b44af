// Counts heap allocations: a test binary that includes this header (once)
// gets a global operator new that counts the calls made by the current
// thread while allocations_in() runs. Each test is its own executable, so
// the replacement never reaches another test.
#pragma once

#include <cstddef>
#include <cstdlib>
#include <new>

// The replacement operator delete frees with free(): where GCC inlines it
// next to a new it can see, it would warn about the pairing it cannot tell
// was replaced as a whole.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wmismatched-new-delete"
#endif

namespace rxtest::alloc_detail {
inline thread_local bool counting = false;
inline thread_local std::size_t count = 0;

inline void* counted(std::size_t n) noexcept {
    if (counting) ++count;
    return std::malloc(n ? n : 1);
}
}  // namespace rxtest::alloc_detail

void* operator new(std::size_t n) {
    if (void* p = rxtest::alloc_detail::counted(n)) return p;
    throw std::bad_alloc();
}
void* operator new[](std::size_t n) {
    if (void* p = rxtest::alloc_detail::counted(n)) return p;
    throw std::bad_alloc();
}
void* operator new(std::size_t n, const std::nothrow_t&) noexcept {
    return rxtest::alloc_detail::counted(n);
}
void* operator new[](std::size_t n, const std::nothrow_t&) noexcept {
    return rxtest::alloc_detail::counted(n);
}
void operator delete(void* p) noexcept { std::free(p); }
void operator delete[](void* p) noexcept { std::free(p); }
void operator delete(void* p, std::size_t) noexcept { std::free(p); }
void operator delete[](void* p, std::size_t) noexcept { std::free(p); }

namespace rxtest {

/// Counts the operator new calls `f` makes on this thread.
template <class F>
std::size_t allocations_in(F&& f) {
    alloc_detail::count = 0;
    alloc_detail::counting = true;
    f();
    alloc_detail::counting = false;
    return alloc_detail::count;
}

}  // namespace rxtest
