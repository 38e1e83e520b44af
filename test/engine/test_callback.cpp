// engine::Callback: keeps handlers that capture a shared_ptr inline (where
// std::function allocates), runs and destroys its target exactly once, and
// falls back to the heap only for targets larger than its inline size.
// Allocations are counted (count_allocations.hpp replaces operator new).
#define BOOST_TEST_MODULE engine_callback
#ifndef BOOST_TEST_DYN_LINK  // meson's boost dependency may define it already
#define BOOST_TEST_DYN_LINK
#endif
#include <boost/test/unit_test.hpp>

#include <functional>
#include <memory>

#include "count_allocations.hpp"
#include "ringxfer/engine/callback.hpp"

using ringxfer::engine::Callback;
using rxtest::allocations_in;

namespace {

/// Counts its live copies, to check a Callback destroys its target once.
struct Tracked {
    int* live;
    explicit Tracked(int* l) : live(l) { ++*live; }
    Tracked(Tracked&& o) noexcept : live(o.live) { ++*live; }
    Tracked(const Tracked& o) : live(o.live) { ++*live; }
    ~Tracked() { --*live; }
};

}  // namespace

BOOST_AUTO_TEST_SUITE(callback)

BOOST_AUTO_TEST_CASE(shared_ptr_capture_is_stored_inline) {
    auto owner = std::make_shared<int>(41);
    Callback<int(int)> cb;
    std::size_t n = allocations_in([&] {
        cb = [owner](int x) { return *owner + x; };
        Callback<int(int)> moved = std::move(cb);
        cb = std::move(moved);
    });
    BOOST_TEST(n == 0u);
    BOOST_TEST(static_cast<bool>(cb));
    BOOST_TEST(cb(1) == 42);
    BOOST_TEST(owner.use_count() == 2);  // one capture, not leaked by the moves
    cb = nullptr;
    BOOST_TEST(owner.use_count() == 1);
    // std::function allocates for the same capture (why Callback exists).
    BOOST_TEST(allocations_in([&] { std::function<int(int)> f = [owner](int x) { return x; }; }) ==
               1u);
}

BOOST_AUTO_TEST_CASE(large_target_goes_to_the_heap_once) {
    struct Big {
        char pad[200];
        int v;
    };
    Big big{};
    big.v = 7;
    Callback<int()> cb;
    std::size_t n = allocations_in([&] {
        cb = [big] { return big.v; };
        Callback<int()> moved = std::move(cb);  // moves the pointer, no new allocation
        cb = std::move(moved);
    });
    BOOST_TEST(n == 1u);
    BOOST_TEST(cb() == 7);
}

BOOST_AUTO_TEST_CASE(target_is_destroyed_exactly_once) {
    int live = 0;
    {
        Callback<void()> a = [t = Tracked(&live)] {};
        BOOST_TEST(live == 1);
        Callback<void()> b = std::move(a);
        BOOST_TEST(live == 1);
        BOOST_TEST(!a);
        a = std::move(b);
        BOOST_TEST(live == 1);
        a.reset();
        BOOST_TEST(live == 0);
        Callback<void()> c = [t = Tracked(&live)] {};
        c = [t = Tracked(&live)] {};  // assignment destroys the old target
        BOOST_TEST(live == 1);
    }
    BOOST_TEST(live == 0);
}

BOOST_AUTO_TEST_CASE(move_only_captures_and_arguments) {
    auto p = std::make_unique<int>(5);
    Callback<int(std::unique_ptr<int>)> cb = [p = std::move(p)](std::unique_ptr<int> q) mutable {
        return *p + *q;
    };
    BOOST_TEST(cb(std::make_unique<int>(6)) == 11);
}

BOOST_AUTO_TEST_CASE(empty_sources_make_empty_callbacks) {
    std::function<void()> none;
    Callback<void()> a = none;
    BOOST_TEST(!a);
    BOOST_TEST((a == nullptr));
    void (*fp)() = nullptr;
    Callback<void()> b = fp;
    BOOST_TEST(!b);
    Callback<void()> c = nullptr;
    BOOST_TEST(!c);
    int calls = 0;
    std::function<void()> some = [&] { ++calls; };
    Callback<void()> d = some;  // a std::function is a target like any other
    d();
    BOOST_TEST(calls == 1);
}

BOOST_AUTO_TEST_SUITE_END()
