#define BOOST_TEST_MODULE engine_buffer_pool
#ifndef BOOST_TEST_DYN_LINK  // meson's boost dependency may define it already
#define BOOST_TEST_DYN_LINK
#endif
#include <boost/test/unit_test.hpp>

#include <fcntl.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <cstdint>
#include <cstring>
#include <map>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <thread>
#include <vector>

#include "ringxfer/engine/buffer_pool.hpp"
#include "ringxfer/engine/error.hpp"
#include "ringxfer/engine/ring.hpp"
#include "ringxfer/engine/socket.hpp"
#include "ringxfer/engine/stream.hpp"
#include "rx_test.hpp"

using namespace ringxfer::engine;

namespace {

constexpr std::size_t KiB = 1024;
constexpr std::size_t MiB = 1024 * 1024;

PoolOptions unregistered(std::size_t budget = std::size_t{4} << 30) {
    PoolOptions o;
    o.budget_bytes = budget;
    o.register_buffers = false;
    o.huge_pages = false;
    return o;
}

/// Completion used to run one fixed-buffer read/write through a ring.
struct OneShot final : Completion {
    int calls = 0;
    int32_t res = 0;
    void complete(int32_t r, uint32_t) override {
        ++calls;
        res = r;
    }
};

}  // namespace

BOOST_AUTO_TEST_SUITE(class_size)

BOOST_AUTO_TEST_CASE(floor_is_4_kib) {
    BOOST_TEST(BufferPool::class_size(0) == 4 * KiB);
    BOOST_TEST(BufferPool::class_size(1) == 4 * KiB);
    BOOST_TEST(BufferPool::class_size(4095) == 4 * KiB);
    BOOST_TEST(BufferPool::class_size(4096) == 4 * KiB);
    BOOST_TEST(BufferPool::class_size(4097) == 8 * KiB);
}

BOOST_AUTO_TEST_CASE(powers_of_two_up_to_1_mib) {
    for (std::size_t k = 12; k <= 20; ++k) {
        std::size_t p = std::size_t{1} << k;
        BOOST_TEST_CONTEXT("2^" << k) {
            BOOST_TEST(BufferPool::class_size(p) == p);
            if (k > 12) BOOST_TEST(BufferPool::class_size(p / 2 + 1) == p);
            if (k < 20) BOOST_TEST(BufferPool::class_size(p + 1) == 2 * p);
        }
    }
    // Just above 1 MiB the eighth steps start: 1 MiB + 128 KiB.
    BOOST_TEST(BufferPool::class_size(MiB + 1) == MiB + 128 * KiB);
}

BOOST_AUTO_TEST_CASE(at_most_one_eighth_waste_above_1_mib) {
    BOOST_TEST(BufferPool::class_size(100'000'000) == 100663296u);  // 96 MiB
    BOOST_TEST(BufferPool::class_size(100663296) == 100663296u);
    BOOST_TEST(BufferPool::class_size(std::size_t{1} << 30) == std::size_t{1} << 30);
    BOOST_TEST(BufferPool::class_size((std::size_t{1} << 30) + 1) ==
               (std::size_t{1} << 30) + (std::size_t{1} << 27));

    std::uint64_t x = 12345;
    std::size_t prev_bytes = 0, prev_cap = 0;
    std::vector<std::size_t> samples;
    for (int i = 0; i < 20000; ++i) {
        x = rxtest::mix64(x);
        samples.push_back(MiB + x % (std::size_t{8} << 30));
    }
    for (std::size_t k = 20; k < 40; ++k) {
        std::size_t p = std::size_t{1} << k;
        for (std::size_t d : {std::size_t{1}, p / 8 - 1, p / 8, p / 8 + 1, p - 1})
            samples.push_back(p + d);
    }
    std::sort(samples.begin(), samples.end());
    for (std::size_t b : samples) {
        std::size_t cap = BufferPool::class_size(b);
        BOOST_TEST_CONTEXT("bytes " << b << " capacity " << cap) {
            BOOST_TEST(cap >= b);
            BOOST_TEST((cap - b) * 8 <= cap);  // <= 12.5% of the buffer wasted
            std::size_t floor2 = std::size_t{1} << (63 - __builtin_clzll(cap - 1));
            BOOST_TEST(cap % (floor2 / 8) == 0);  // one of the eight steps
            if (b >= prev_bytes) BOOST_TEST(cap >= prev_cap);  // monotone
        }
        prev_bytes = b;
        prev_cap = cap;
    }
}

BOOST_AUTO_TEST_SUITE_END()

BOOST_AUTO_TEST_SUITE(leasing)

BOOST_AUTO_TEST_CASE(lease_and_return_restore_counters) {
    BufferPool pool(nullptr, unregistered());
    {
        Lease a, b;
        BOOST_REQUIRE(pool.lease(1000, a) == 0);
        BOOST_REQUIRE(pool.lease(70000, b) == 0);
        BOOST_TEST(static_cast<bool>(a));
        BOOST_TEST(a.size() == 1000u);
        BOOST_TEST(a.capacity() == 4 * KiB);
        BOOST_TEST(b.size() == 70000u);
        BOOST_TEST(b.capacity() == 128 * KiB);
        BOOST_TEST(a.buf_index() == -1);  // no ring: never registered
        BOOST_TEST(a.span().size() == 1000u);
        BOOST_TEST(a.span().data() == a.data());
        std::memset(a.data(), 0xab, a.capacity());
        std::memset(b.data(), 0xcd, b.capacity());

        PoolStats s = pool.stats();
        BOOST_TEST(s.leased_buffers == 2u);
        BOOST_TEST(s.leased_bytes == 4 * KiB + 128 * KiB);
        BOOST_TEST(s.misses == 2u);
        BOOST_TEST(s.regions == 2u);
        BOOST_TEST(s.mapped_bytes == 4 * MiB);
        BOOST_TEST(s.free_buffers == (2 * MiB / (4 * KiB) - 1) + (2 * MiB / (128 * KiB) - 1));

        a.reset();
        BOOST_TEST(!a);
        BOOST_TEST(a.data() == nullptr);
        BOOST_TEST(pool.stats().leased_buffers == 1u);
        BOOST_TEST(pool.stats().leased_bytes == 128 * KiB);
        a.reset();  // idempotent
        BOOST_TEST(pool.stats().leased_buffers == 1u);
    }
    PoolStats s = pool.stats();
    BOOST_TEST(s.leased_buffers == 0u);
    BOOST_TEST(s.leased_bytes == 0u);
    BOOST_TEST(s.free_bytes == s.mapped_bytes);  // regions kept for reuse
    BOOST_TEST(s.failures == 0u);
}

BOOST_AUTO_TEST_CASE(lease_of_zero_bytes_takes_no_memory) {
    BufferPool pool(nullptr, unregistered());
    Lease l;
    BOOST_TEST(pool.lease(0, l) == 0);
    BOOST_TEST(!l);
    BOOST_TEST(l.size() == 0u);
    BOOST_TEST(pool.stats().leased_buffers == 0u);
    BOOST_TEST(pool.stats().mapped_bytes == 0u);
}

BOOST_AUTO_TEST_CASE(lease_into_a_live_lease_returns_the_old_buffer) {
    BufferPool pool(nullptr, unregistered());
    Lease l;
    BOOST_REQUIRE(pool.lease(100, l) == 0);
    BOOST_REQUIRE(pool.lease(200, l) == 0);
    BOOST_TEST(l.size() == 200u);
    BOOST_TEST(pool.stats().leased_buffers == 1u);
}

BOOST_AUTO_TEST_CASE(budget_exhaustion_gives_enobufs_and_recovers) {
    BufferPool pool(nullptr, unregistered(2 * MiB));  // room for one region
    Lease a, b, c;
    BOOST_REQUIRE(pool.lease(MiB, a) == 0);  // 1 MiB class: 2 slabs per 2 MiB region
    BOOST_REQUIRE(pool.lease(MiB, b) == 0);
    BOOST_TEST(pool.stats().mapped_bytes == 2 * MiB);

    BOOST_TEST(pool.lease(MiB, c) == -ENOBUFS);
    BOOST_TEST(!c);
    BOOST_TEST(pool.lease(4096, c) == -ENOBUFS);  // other classes need a region too
    BOOST_TEST(pool.stats().failures == 2u);
    BOOST_TEST(pool.stats().mapped_bytes == 2 * MiB);  // never above the budget

    a.reset();
    BOOST_TEST(pool.lease(MiB, c) == 0);
    BOOST_TEST(static_cast<bool>(c));
    BOOST_TEST(pool.stats().leased_buffers == 2u);
}

BOOST_AUTO_TEST_CASE(above_max_buffer_bytes_gives_emsgsize) {
    PoolOptions o = unregistered();
    o.max_buffer_bytes = MiB;
    BufferPool pool(nullptr, o);
    Lease l;
    BOOST_TEST(pool.lease(MiB + 1, l) == -EMSGSIZE);
    BOOST_TEST(!l);
    BOOST_TEST(pool.stats().failures == 1u);
    BOOST_TEST(pool.stats().mapped_bytes == 0u);
    BOOST_TEST(pool.lease(MiB, l) == 0);
    BOOST_TEST(pool.options().max_buffer_bytes == MiB);
}

BOOST_AUTO_TEST_CASE(a_slot_has_one_owner_and_is_reused) {
    BufferPool pool(nullptr, unregistered());
    constexpr std::size_t kSlabs = 2 * MiB / (4 * KiB);  // one full 4 KiB region
    std::vector<Lease> leases(kSlabs);
    for (std::size_t i = 0; i < kSlabs; ++i) BOOST_REQUIRE(pool.lease(4096, leases[i]) == 0);
    BOOST_TEST(pool.stats().misses == 1u);
    BOOST_TEST(pool.stats().hits == kSlabs - 1);
    BOOST_TEST(pool.stats().free_buffers == 0u);

    // Distinct, non-overlapping ranges.
    std::vector<std::pair<std::byte*, std::size_t>> ranges;
    for (auto& l : leases) ranges.emplace_back(l.data(), l.capacity());
    std::sort(ranges.begin(), ranges.end());
    for (std::size_t i = 1; i < ranges.size(); ++i)
        BOOST_TEST_REQUIRE(ranges[i - 1].first + ranges[i - 1].second <= ranges[i].first);

    // Each owner writes its whole slab; nobody else's write lands there.
    for (std::size_t i = 0; i < kSlabs; ++i) rxtest::fill_pattern({leases[i].data(), 4096}, i);
    for (std::size_t i = 0; i < kSlabs; ++i)
        BOOST_TEST_REQUIRE(rxtest::matches_pattern({leases[i].data(), 4096}, i));

    // The only free slot in the pool is the one just returned: it is reused.
    std::byte* returned = leases[100].data();
    leases[100].reset();
    Lease again;
    auto hits = pool.stats().hits;
    BOOST_REQUIRE(pool.lease(10, again) == 0);
    BOOST_TEST(again.data() == returned);
    BOOST_TEST(pool.stats().hits == hits + 1);
    BOOST_TEST(pool.stats().misses == 1u);

    // One more than fits: a second region, not a shared slot.
    Lease extra;
    BOOST_REQUIRE(pool.lease(4096, extra) == 0);
    BOOST_TEST(pool.stats().misses == 2u);
    for (auto& l : leases)
        if (l) BOOST_TEST_REQUIRE(l.data() != extra.data());
}

BOOST_AUTO_TEST_CASE(steady_state_maps_nothing_new) {
    BufferPool pool(nullptr, unregistered());
    const std::size_t sizes[] = {1, 4096, 5000, 65536, 300000, MiB, MiB + 3, 3 * MiB};
    {  // warm-up: one lease of each class alive at once
        std::vector<Lease> warm(std::size(sizes));
        for (std::size_t i = 0; i < std::size(sizes); ++i)
            BOOST_REQUIRE(pool.lease(sizes[i], warm[i]) == 0);
    }
    PoolStats before = pool.stats();
    for (int cycle = 0; cycle < 1000; ++cycle) {
        Lease l;
        std::size_t sz = sizes[static_cast<std::size_t>(cycle) % std::size(sizes)];
        BOOST_REQUIRE(pool.lease(sz, l) == 0);
        l.data()[0] = std::byte{1};
        l.data()[sz - 1] = std::byte{2};
    }
    PoolStats after = pool.stats();
    BOOST_TEST(after.misses == before.misses);
    BOOST_TEST(after.mapped_bytes == before.mapped_bytes);
    BOOST_TEST(after.regions == before.regions);
    BOOST_TEST(after.hits == before.hits + 1000);
    BOOST_TEST(after.leased_buffers == 0u);
}

BOOST_AUTO_TEST_CASE(eviction_frees_idle_regions_of_other_classes) {
    BufferPool pool(nullptr, unregistered(4 * MiB));  // two 2 MiB regions
    Lease a, b, c, d;
    BOOST_REQUIRE(pool.lease(4 * KiB, a) == 0);
    BOOST_REQUIRE(pool.lease(8 * KiB, b) == 0);
    BOOST_TEST(pool.stats().mapped_bytes == 4 * MiB);

    // Nothing idle: a third class cannot get a region.
    BOOST_TEST(pool.lease(16 * KiB, c) == -ENOBUFS);

    // The 8 KiB region becomes idle: it is unmapped to make room.
    b.reset();
    BOOST_REQUIRE(pool.lease(16 * KiB, c) == 0);
    PoolStats s = pool.stats();
    BOOST_TEST(s.mapped_bytes == 4 * MiB);
    BOOST_TEST(s.regions == 2u);
    BOOST_TEST(s.misses == 3u);
    BOOST_TEST(s.free_buffers == (512u - 1) + (128u - 1));  // the 8 KiB slabs are gone
    std::memset(c.data(), 0x5a, c.capacity());

    // The 8 KiB class really lost its region: a new one does not fit now.
    BOOST_TEST(pool.lease(8 * KiB, d) == -ENOBUFS);
    // The 4 KiB region is still in use and was not touched.
    std::memset(a.data(), 0x11, a.capacity());
}

BOOST_AUTO_TEST_CASE(large_lease_uses_a_96_mib_buffer_for_100_mb) {
    BufferPool pool(nullptr, unregistered());
    Lease l;
    BOOST_REQUIRE(pool.lease(100'000'000, l) == 0);
    BOOST_TEST(l.size() == 100'000'000u);
    BOOST_TEST(l.capacity() == 100663296u);
    BOOST_TEST(pool.stats().mapped_bytes == 100663296u);  // one region, no 128 MiB round-up
    l.data()[0] = std::byte{1};
    l.data()[l.capacity() - 1] = std::byte{2};
}

BOOST_AUTO_TEST_CASE(pool_destroyed_before_its_leases) {
    std::vector<Lease> leases(3);
    {
        BufferPool pool(nullptr, unregistered());
        BOOST_REQUIRE(pool.lease(4096, leases[0]) == 0);
        BOOST_REQUIRE(pool.lease(MiB + 3, leases[1]) == 0);
        BOOST_REQUIRE(pool.lease(100, leases[2]) == 0);
    }
    // The memory lives until the last lease goes (ASan checks both ways).
    for (std::size_t i = 0; i < leases.size(); ++i)
        rxtest::fill_pattern({leases[i].data(), leases[i].capacity()}, i);
    for (std::size_t i = 0; i < leases.size(); ++i)
        BOOST_TEST(rxtest::matches_pattern({leases[i].data(), leases[i].capacity()}, i));
    leases[1].reset();
    Lease moved = std::move(leases[0]);
    BOOST_TEST(static_cast<bool>(moved));
    leases.clear();
    moved.reset();  // last one: the pool core goes away here
}

BOOST_AUTO_TEST_CASE(leases_released_on_another_thread) {
    BufferPool pool(nullptr, unregistered());
    std::vector<Lease> leases(64);
    for (std::size_t i = 0; i < leases.size(); ++i)
        BOOST_REQUIRE(pool.lease(1000 * (i + 1), leases[i]) == 0);
    std::thread t([l = std::move(leases)]() mutable { l.clear(); });
    // Meanwhile this thread keeps leasing and returning.
    for (int i = 0; i < 2000; ++i) {
        Lease x;
        BOOST_REQUIRE(pool.lease(static_cast<std::size_t>(i % 7 + 1) * 3000, x) == 0);
    }
    t.join();
    BOOST_TEST(pool.stats().leased_buffers == 0u);
    BOOST_TEST(pool.stats().leased_bytes == 0u);
}

BOOST_AUTO_TEST_CASE(lease_move_semantics) {
    BufferPool pool(nullptr, unregistered());
    Lease a;
    BOOST_REQUIRE(pool.lease(5000, a) == 0);
    std::byte* p = a.data();
    std::size_t cap = a.capacity();

    Lease b(std::move(a));
    BOOST_TEST(!a);  // NOLINT(bugprone-use-after-move): moved-from state is specified
    BOOST_TEST(a.data() == nullptr);
    BOOST_TEST(a.size() == 0u);
    BOOST_TEST(a.capacity() == 0u);
    BOOST_TEST(a.buf_index() == -1);
    BOOST_TEST(b.data() == p);
    BOOST_TEST(b.size() == 5000u);
    BOOST_TEST(b.capacity() == cap);
    BOOST_TEST(pool.stats().leased_buffers == 1u);

    a.reset();  // harmless on a moved-from lease
    BOOST_TEST(pool.stats().leased_buffers == 1u);

    // Move-assigning over a live lease returns the target's old buffer.
    Lease c;
    BOOST_REQUIRE(pool.lease(100, c) == 0);
    BOOST_TEST(pool.stats().leased_buffers == 2u);
    c = std::move(b);
    BOOST_TEST(pool.stats().leased_buffers == 1u);
    BOOST_TEST(c.data() == p);
    BOOST_TEST(!b);

    // Self-move leaves it intact.
    Lease& alias = c;
    c = std::move(alias);
    BOOST_TEST(c.data() == p);
    BOOST_TEST(pool.stats().leased_buffers == 1u);

    // Moving into an empty lease from an empty one changes nothing.
    Lease e1, e2;
    e1 = std::move(e2);
    BOOST_TEST(!e1);
    c = Lease();
    BOOST_TEST(pool.stats().leased_buffers == 0u);
}

BOOST_AUTO_TEST_SUITE_END()

BOOST_AUTO_TEST_SUITE(shared_views)

BOOST_AUTO_TEST_CASE(views_keep_the_slab_until_the_last_owner_is_gone) {
    BufferPool pool(nullptr, unregistered());
    Lease a;
    BOOST_REQUIRE(pool.lease(10000, a) == 0);
    std::byte* base = a.data();
    rxtest::fill_pattern({base, 10000}, 1);

    Lease v = a.share(100, 500);
    BOOST_REQUIRE(static_cast<bool>(v));
    BOOST_TEST(v.data() == base + 100);
    BOOST_TEST(v.size() == 500u);
    BOOST_TEST(v.capacity() == a.capacity() - 100);
    BOOST_TEST(v.buf_index() == a.buf_index());
    Lease whole = a.share();
    BOOST_TEST(whole.data() == base);
    BOOST_TEST(whole.size() == 10000u);
    BOOST_TEST(pool.stats().leased_buffers == 1u);  // one slab, three owners

    a.reset();
    whole.reset();
    BOOST_TEST(pool.stats().leased_buffers == 1u);  // v still holds it
    BOOST_TEST(rxtest::matches_pattern({v.data(), 500}, 1, 100));

    // While a view lives, the slab is nobody else's.
    Lease other;
    BOOST_REQUIRE(pool.lease(10000, other) == 0);
    BOOST_TEST(other.data() != base);
    other.reset();

    Lease moved = std::move(v);
    BOOST_TEST(!v);  // NOLINT(bugprone-use-after-move)
    BOOST_TEST(pool.stats().leased_buffers == 1u);
    moved.reset();
    BOOST_TEST(pool.stats().leased_buffers == 0u);
    BOOST_TEST(pool.stats().leased_bytes == 0u);

    // Returned exactly once: the slab comes back (LIFO) and the counts add up.
    Lease again;
    BOOST_REQUIRE(pool.lease(10000, again) == 0);
    BOOST_TEST(again.data() == base);
    PoolStats s = pool.stats();
    BOOST_TEST(s.free_buffers + s.leased_buffers == 2 * MiB / (16 * KiB));
}

BOOST_AUTO_TEST_CASE(out_of_range_views_are_empty) {
    BufferPool pool(nullptr, unregistered());
    Lease a;
    BOOST_REQUIRE(pool.lease(1000, a) == 0);
    BOOST_TEST(!a.share(0, 1001));
    BOOST_TEST(!a.share(1001, 0));
    BOOST_TEST(!a.share(500, 501));
    BOOST_TEST(!a.share(std::size_t(-1), 2));  // no wrap-around
    BOOST_TEST(static_cast<bool>(a.share(999, 1)));
    BOOST_TEST(!Lease().share());
    BOOST_TEST(pool.stats().leased_buffers == 1u);
    a.reset();
    BOOST_TEST(pool.stats().leased_buffers == 0u);
}

BOOST_AUTO_TEST_CASE(views_dropped_on_several_threads_return_the_slab_once) {
    BufferPool pool(nullptr, unregistered());
    for (int round = 0; round < 20; ++round) {
        Lease a;
        BOOST_REQUIRE(pool.lease(64 * KiB, a) == 0);
        std::vector<Lease> v1, v2;
        for (std::size_t i = 0; i < 500; ++i) {
            v1.push_back(a.share(i, 100));
            v2.push_back(a.share(i * 2, 50));
        }
        std::thread t1([v = std::move(v1)]() mutable { v.clear(); });
        std::thread t2([v = std::move(v2)]() mutable { v.clear(); });
        a.reset();
        t1.join();
        t2.join();
        PoolStats s = pool.stats();
        BOOST_TEST_REQUIRE(s.leased_buffers == 0u);
        BOOST_TEST_REQUIRE(s.free_buffers == 2 * MiB / (64 * KiB));  // not returned twice
    }
}

BOOST_AUTO_TEST_CASE(views_outlive_the_pool) {
    Lease v;
    {
        BufferPool pool(nullptr, unregistered());
        Lease a;
        BOOST_REQUIRE(pool.lease(8000, a) == 0);
        rxtest::fill_pattern({a.data(), 8000}, 3);
        v = a.share(4000, 4000);
    }
    BOOST_TEST(rxtest::matches_pattern({v.data(), 4000}, 3, 4000));
    std::memset(v.data(), 0, v.size());
    v.reset();
}

BOOST_AUTO_TEST_SUITE_END()

BOOST_AUTO_TEST_SUITE(registration)

BOOST_AUTO_TEST_CASE(unregistered_pool_has_no_fixed_index) {
    Ring ring;
    PoolOptions o;
    o.register_buffers = false;
    BufferPool pool(&ring, o);
    Lease l;
    BOOST_REQUIRE(pool.lease(4096, l) == 0);
    BOOST_TEST(l.buf_index() == -1);
    BOOST_TEST(pool.stats().registered_bytes == 0u);
    BOOST_TEST(!pool.stats().registration_failed);
}

BOOST_AUTO_TEST_CASE(registered_regions_work_for_fixed_operations) {
    RingOptions ro;
    ro.restrict_ops = false;  // WRITE_FIXED (into a pipe) is not one of the engine's opcodes
    Ring ring(ro);
    std::vector<std::string> warnings;
    PoolOptions o;
    o.budget_bytes = 4 * MiB;
    o.warn = [&](std::string_view m) { warnings.emplace_back(m); };
    BufferPool pool(&ring, o);

    Lease first, second;
    BOOST_REQUIRE(pool.lease(4096, first) == 0);
    BOOST_REQUIRE(pool.lease(4096, second) == 0);  // same region, another slab
    PoolStats s = pool.stats();
    if (s.registration_failed) {
        // Only acceptable as an environment limit, and then it must say so.
        BOOST_TEST(warnings.size() == 1u);
        BOOST_TEST_MESSAGE("buffer registration unavailable here: "
                           << (warnings.empty() ? "" : warnings[0]));
        BOOST_TEST(first.buf_index() == -1);
        return;
    }
    BOOST_TEST(warnings.empty());
    BOOST_TEST(s.registered_bytes > 0u);
    BOOST_TEST(s.registered_bytes == s.mapped_bytes);
    BOOST_TEST(first.buf_index() >= 0);
    BOOST_TEST(second.buf_index() == first.buf_index());  // one fixed buffer per region

    int p[2];
    BOOST_REQUIRE(::pipe2(p, O_CLOEXEC) == 0);
    Fd rd(p[0]), wr(p[1]);

    // WRITE_FIXED from the second slab: the kernel must see our bytes.
    rxtest::fill_pattern({second.data(), 3000}, 7);
    OneShot w;
    io_uring_prep_write_fixed(ring.sqe(&w), wr.get(), second.data(), 3000, 0,
                              second.buf_index());
    BOOST_REQUIRE(rxtest::drive(ring, [&] { return w.calls == 1; }));
    BOOST_TEST(w.res == 3000);
    auto got = rxtest::read_exact(rd.get(), 3000);
    BOOST_TEST(rxtest::matches_pattern(got, 7));

    // READ_FIXED into the first slab.
    auto src = rxtest::pattern_vector(2000, 8);
    BOOST_REQUIRE(rxtest::write_all(wr.get(), src));
    OneShot r;
    io_uring_prep_read_fixed(ring.sqe(&r), rd.get(), first.data(), 2000, 0, first.buf_index());
    BOOST_REQUIRE(rxtest::drive(ring, [&] { return r.calls == 1; }));
    BOOST_TEST(r.res == 2000);
    BOOST_TEST(rxtest::matches_pattern({first.data(), 2000}, 8));

    // Eviction unregisters the idle region; the replacement is registered
    // and usable for fixed operations.
    Lease other;
    BOOST_REQUIRE(pool.lease(8 * KiB, other) == 0);
    BOOST_TEST(pool.stats().mapped_bytes == 4 * MiB);
    other.reset();
    Lease third;
    BOOST_REQUIRE(pool.lease(16 * KiB, third) == 0);  // evicts the 8 KiB region
    BOOST_TEST(pool.stats().regions == 2u);
    BOOST_TEST(pool.stats().registered_bytes == 4 * MiB);
    BOOST_REQUIRE(third.buf_index() >= 0);
    rxtest::fill_pattern({third.data(), 16 * KiB}, 9);
    OneShot w2;
    io_uring_prep_write_fixed(ring.sqe(&w2), wr.get(), third.data(), 16 * KiB, 0,
                              third.buf_index());
    BOOST_REQUIRE(rxtest::drive(ring, [&] { return w2.calls == 1; }));
    BOOST_TEST(w2.res == static_cast<int>(16 * KiB));
    BOOST_TEST(rxtest::matches_pattern(rxtest::read_exact(rd.get(), 16 * KiB), 9));
    BOOST_TEST(ring.in_flight() == 0u);
}

// page_offset: every buffer starts that far past a page boundary, keeps its
// whole capacity (neighbours do not overlap, the last slab of a region has
// the extra page it needs) and stays usable for fixed operations.
BOOST_AUTO_TEST_CASE(page_offset_shifts_every_buffer_and_keeps_its_capacity) {
    for (std::size_t cap : {4 * KiB, 1 * MiB, MiB + MiB / 8}) {
        BOOST_TEST_CONTEXT("class " << cap) {
            PoolOptions o = unregistered();
            o.page_offset = 16;
            BufferPool pool(nullptr, o);
            std::vector<Lease> all;
            do {  // every slab of the first region
                all.emplace_back();
                BOOST_REQUIRE(pool.lease(cap, all.back()) == 0);
            } while (pool.stats().free_buffers > 0);
            BOOST_TEST(pool.stats().regions == 1u);
            for (std::size_t i = 0; i < all.size(); ++i) {
                BOOST_TEST(reinterpret_cast<std::uintptr_t>(all[i].data()) % 4096 == 16u);
                BOOST_TEST(all[i].capacity() == cap);
                rxtest::fill_pattern({all[i].data(), cap}, static_cast<unsigned>(i));
            }
            for (std::size_t i = 0; i < all.size(); ++i)
                BOOST_TEST(rxtest::matches_pattern({all[i].data(), cap}, static_cast<unsigned>(i)));
        }
    }
    Lease plain;
    BufferPool dflt(nullptr, unregistered());
    BOOST_REQUIRE(dflt.lease(4096, plain) == 0);
    BOOST_TEST(reinterpret_cast<std::uintptr_t>(plain.data()) % 4096 == 0u);

    PoolOptions bad = unregistered();
    bad.page_offset = 4096;
    BOOST_CHECK_EXCEPTION(BufferPool(nullptr, bad), Error,
                          [](const Error& e) { return e.code() == EINVAL; });
}

BOOST_AUTO_TEST_CASE(page_offset_buffers_work_for_fixed_operations_to_their_last_byte) {
    RingOptions ro;
    ro.restrict_ops = false;  // WRITE_FIXED into a pipe
    Ring ring(ro);
    PoolOptions o;
    o.page_offset = 16;
    o.warn = [](std::string_view) {};
    BufferPool pool(&ring, o);
    Lease a, b;  // the two 1 MiB slabs of one region: b ends in the extra page
    BOOST_REQUIRE(pool.lease(MiB, a) == 0);
    BOOST_REQUIRE(pool.lease(MiB, b) == 0);
    if (pool.stats().registration_failed) {
        BOOST_TEST_MESSAGE("buffer registration unavailable here");
        return;
    }
    BOOST_TEST(pool.stats().registered_bytes == pool.stats().mapped_bytes);
    int p[2];
    BOOST_REQUIRE(::pipe2(p, O_CLOEXEC) == 0);
    Fd rd(p[0]), wr(p[1]);
    std::byte* tail = b.data() + MiB - 4096;
    rxtest::fill_pattern({tail, 4096}, 3);
    OneShot w;
    io_uring_prep_write_fixed(ring.sqe(&w), wr.get(), tail, 4096, 0, b.buf_index());
    BOOST_REQUIRE(rxtest::drive(ring, [&] { return w.calls == 1; }));
    BOOST_TEST(w.res == 4096);
    BOOST_TEST(rxtest::matches_pattern(rxtest::read_exact(rd.get(), 4096), 3));
}

BOOST_AUTO_TEST_CASE(registered_pool_destroyed_before_its_leases) {
    Ring ring;
    Lease keep;
    {
        BufferPool pool(&ring);
        BOOST_REQUIRE(pool.lease(64 * KiB, keep) == 0);
    }
    std::memset(keep.data(), 0x42, keep.capacity());
    BOOST_TEST(std::to_integer<int>(keep.data()[keep.capacity() - 1]) == 0x42);
    keep.reset();
}

BOOST_AUTO_TEST_SUITE_END()

// Lease::wrap: the same owner type over memory the pool does not own. What
// must hold: on_release runs exactly once, after the last handle (wherever
// it is dropped), never for a moved-from handle, and never while the kernel
// may still read the memory.
BOOST_AUTO_TEST_SUITE(wrapped_memory)

namespace {

/// Counts on_release runs and remembers the thread of the last one.
struct ReleaseProbe {
    std::atomic<int> calls{0};
    std::atomic<std::thread::id> thread{};
    Callback<void()> callback() {
        return [this] {
            thread.store(std::this_thread::get_id());
            calls.fetch_add(1);
        };
    }
};

}  // namespace

BOOST_AUTO_TEST_CASE(wrap_exposes_the_callers_memory_unregistered) {
    std::vector<std::byte> mem = rxtest::pattern_vector(5000, 11);
    ReleaseProbe probe;
    Lease l = Lease::wrap(mem, probe.callback());
    BOOST_TEST(static_cast<bool>(l));
    BOOST_TEST(l.data() == mem.data());
    BOOST_TEST(l.size() == 5000u);
    BOOST_TEST(l.capacity() == 5000u);
    BOOST_TEST(l.buf_index() == -1);
    BOOST_TEST(l.span().data() == mem.data());
    BOOST_TEST(l.span().size() == 5000u);
    BOOST_TEST(l.unique());
    BOOST_TEST(rxtest::matches_pattern(l.span(), 11));  // the caller's bytes, not a copy
    l.data()[4999] = std::byte{0x7e};                   // and writes land in the caller's memory
    BOOST_TEST(std::to_integer<int>(mem[4999]) == 0x7e);

    BOOST_TEST(probe.calls.load() == 0);
    l.reset();
    BOOST_TEST(probe.calls.load() == 1);
    BOOST_TEST(!l);
    BOOST_TEST(l.data() == nullptr);
    l.reset();  // idempotent
    BOOST_TEST(probe.calls.load() == 1);
}

BOOST_AUTO_TEST_CASE(on_release_runs_once_after_the_last_share) {
    std::vector<std::byte> mem(10000);
    ReleaseProbe probe;
    std::optional<Lease> whole(Lease::wrap(mem, probe.callback()));
    Lease a = whole->share();
    Lease b = whole->share(100, 500);
    Lease c = b.share(10, 20);         // a view of a view
    Lease d = whole->share(10000, 0);  // empty range at the end: still a handle
    BOOST_REQUIRE(static_cast<bool>(a));
    BOOST_REQUIRE(static_cast<bool>(b));
    BOOST_REQUIRE(static_cast<bool>(c));
    BOOST_REQUIRE(static_cast<bool>(d));
    BOOST_TEST(!whole->share(9000, 1001));  // out of range: no handle, no count
    BOOST_TEST(b.data() == mem.data() + 100);
    BOOST_TEST(b.size() == 500u);
    BOOST_TEST(b.capacity() == 10000u - 100);
    BOOST_TEST(c.data() == mem.data() + 110);
    BOOST_TEST(c.size() == 20u);
    BOOST_TEST(c.buf_index() == -1);
    BOOST_TEST(!whole->unique());

    // The original goes first: the views keep the memory.
    whole.reset();
    BOOST_TEST(probe.calls.load() == 0);
    a.reset();
    BOOST_TEST(probe.calls.load() == 0);
    d.reset();
    BOOST_TEST(probe.calls.load() == 0);
    b.reset();
    BOOST_TEST(probe.calls.load() == 0);
    BOOST_TEST(c.unique());
    c.reset();  // the last handle
    BOOST_TEST(probe.calls.load() == 1);
    c.reset();
    a.reset();
    BOOST_TEST(probe.calls.load() == 1);
}

BOOST_AUTO_TEST_CASE(on_release_runs_on_the_thread_that_drops_the_last_handle) {
    std::vector<std::byte> mem(4096);
    ReleaseProbe probe;
    Lease l = Lease::wrap(mem, probe.callback());
    Lease keep = l.share(1, 10);
    l.reset();  // this thread drops one handle: not the last
    BOOST_REQUIRE(probe.calls.load() == 0);

    std::thread::id dropper;
    int calls_before_drop = -1;
    std::thread t([&, v = std::move(keep)]() mutable {
        dropper = std::this_thread::get_id();
        calls_before_drop = probe.calls.load();
        v.reset();
    });
    t.join();
    BOOST_TEST(calls_before_drop == 0);
    BOOST_TEST(probe.calls.load() == 1);
    BOOST_TEST((probe.thread.load() == dropper));
    BOOST_TEST((probe.thread.load() != std::this_thread::get_id()));
}

BOOST_AUTO_TEST_CASE(shares_dropped_on_several_threads_release_once) {
    std::vector<std::byte> mem(64 * KiB);
    for (int round = 0; round < 50; ++round) {
        ReleaseProbe probe;
        Lease a = Lease::wrap(mem, probe.callback());
        std::vector<Lease> v1, v2;
        for (std::size_t i = 0; i < 300; ++i) {
            v1.push_back(a.share(i, 100));
            v2.push_back(a.share(i * 2, 50));
        }
        std::thread t1([v = std::move(v1)]() mutable { v.clear(); });
        std::thread t2([v = std::move(v2)]() mutable { v.clear(); });
        a.reset();
        t1.join();
        t2.join();
        BOOST_TEST_REQUIRE(probe.calls.load() == 1);
    }
}

BOOST_AUTO_TEST_CASE(a_moved_from_wrapped_lease_does_not_release) {
    std::vector<std::byte> m1(100), m2(200);
    ReleaseProbe p1, p2;
    Lease a = Lease::wrap(m1, p1.callback());
    Lease b(std::move(a));
    BOOST_TEST(!a);  // NOLINT(bugprone-use-after-move): moved-from state is specified
    BOOST_TEST(a.size() == 0u);
    a.reset();
    BOOST_TEST(p1.calls.load() == 0);
    BOOST_TEST(b.data() == m1.data());
    BOOST_TEST(b.unique());  // the move made no second count

    // Move-assigning over a live wrapped lease releases the target's memory.
    Lease c = Lease::wrap(m2, p2.callback());
    c = std::move(b);
    BOOST_TEST(p2.calls.load() == 1);
    BOOST_TEST(p1.calls.load() == 0);
    BOOST_TEST(c.data() == m1.data());
    b.reset();  // moved from
    BOOST_TEST(p1.calls.load() == 0);

    Lease& alias = c;
    c = std::move(alias);  // self-move: still the one owner
    BOOST_TEST(c.data() == m1.data());
    BOOST_TEST(p1.calls.load() == 0);

    { Lease d = std::move(c); }  // destroyed: the last handle
    BOOST_TEST(p1.calls.load() == 1);
    c.reset();
    BOOST_TEST(p1.calls.load() == 1);
    BOOST_TEST(p2.calls.load() == 1);
}

BOOST_AUTO_TEST_CASE(zero_length_memory_still_gives_a_live_lease) {
    std::vector<std::byte> mem(8);
    // Both an empty span and a zero-length span of real memory.
    for (std::span<std::byte> s : {std::span<std::byte>{}, std::span<std::byte>(mem.data(), 0)}) {
        BOOST_TEST_CONTEXT("span data " << static_cast<const void*>(s.data())) {
            ReleaseProbe probe;
            Lease l = Lease::wrap(s, probe.callback());
            BOOST_TEST(static_cast<bool>(l));
            BOOST_TEST(l.data() != nullptr);
            BOOST_TEST(l.size() == 0u);
            BOOST_TEST(l.capacity() == 0u);
            BOOST_TEST(l.span().empty());
            BOOST_TEST(l.buf_index() == -1);
            Lease v = l.share();
            BOOST_TEST(static_cast<bool>(v));
            BOOST_TEST(v.size() == 0u);
            l.reset();
            BOOST_TEST(probe.calls.load() == 0);
            v.reset();
            BOOST_TEST(probe.calls.load() == 1);
        }
    }
}

BOOST_AUTO_TEST_CASE(wrap_without_a_callback_just_drops_the_handle) {
    std::vector<std::byte> mem(16);
    Lease l = Lease::wrap(mem, nullptr);
    Lease v = l.share(4, 4);
    BOOST_TEST(v.data() == mem.data() + 4);
    l.reset();
    v.reset();
    BOOST_TEST(!v);
}

// The kernel reads the caller's memory in place; the memory is released only
// after the send handler got the buffers back and let them go, on every send
// path (copying over a Unix socket and TCP, zero-copy over TCP).
BOOST_AUTO_TEST_CASE(a_wrapped_lease_sent_through_a_socket_stream) {
    struct Path {
        const char* name;
        bool tcp;
        bool zerocopy;
    };
    const Path paths[] = {{"unix socketpair", false, false},
                          {"tcp loopback", true, false},
                          {"tcp loopback, SEND_ZC", true, true}};
    for (const Path& path : paths) {
        BOOST_TEST_CONTEXT(path.name) {
            Ring ring;
            if (path.zerocopy && !ring.features().op_send_zc) {
                BOOST_TEST_MESSAGE("kernel without IORING_OP_SEND_ZC: " << path.name << " skipped");
                continue;
            }
            auto [local, peer] = path.tcp ? rxtest::tcp_pair(ring) : rxtest::socket_pair();
            SocketStreamOptions so;
            so.zerocopy_threshold = path.zerocopy ? 1 : 0;
            so.zerocopy_fallback_after = 0;  // stay on SEND_ZC
            auto stream = std::make_unique<SocketStream>(ring, std::move(local), so);

            // Larger than a socket buffer: several completions, short writes
            // resumed from the caller's memory.
            constexpr std::size_t kOffset = 3;
            constexpr std::size_t kBody = 4 * MiB + 5;
            std::vector<std::byte> mem(kOffset + kBody);
            rxtest::fill_pattern({mem.data() + kOffset, kBody}, 31);
            ReleaseProbe probe;
            const std::string prefix = "WRAPPED-HEADER";
            SendBuffers b;
            std::memcpy(b.prefix.data(), prefix.data(), prefix.size());
            b.prefix_len = prefix.size();
            b.body = Lease::wrap(mem, probe.callback());
            b.body_offset = kOffset;
            b.body_len = kBody;

            std::vector<std::byte> got;
            int pfd = peer.get();
            rxtest::PeerThread reader(pfd, stream->fd(), [&, n = prefix.size() + kBody] {
                got = rxtest::read_exact(pfd, n);
            });

            int handler_calls = 0;
            int released_at_handler = -1;
            std::size_t in_flight_at_handler = 99;
            IoResult r;
            SendBuffers back;
            stream->send(std::move(b), [&](SendBuffers sb, IoResult res) {
                ++handler_calls;
                released_at_handler = probe.calls.load();
                in_flight_at_handler = ring.in_flight();
                back = std::move(sb);
                r = res;
            });
            BOOST_TEST(probe.calls.load() == 0);  // the stream owns the only handle
            BOOST_REQUIRE(rxtest::drive(ring, [&] { return handler_calls > 0; }));
            BOOST_TEST(reader.join(), "peer thread was still blocked and had to be aborted");

            BOOST_TEST(handler_calls == 1);
            BOOST_TEST(released_at_handler == 0);
            if (path.zerocopy) {
                BOOST_TEST(in_flight_at_handler == 0u);  // after the notification
                BOOST_TEST(stream->counters().zc_sends > 0u);
            }
            BOOST_TEST(r.ok());
            BOOST_TEST(r.bytes == prefix.size() + kBody);
            BOOST_REQUIRE(got.size() == prefix.size() + kBody);
            BOOST_TEST(std::memcmp(got.data(), prefix.data(), prefix.size()) == 0);
            BOOST_TEST(rxtest::pattern_mismatch({got.data() + prefix.size(), kBody}, 31) ==
                       static_cast<std::size_t>(-1));
            // The handler got the caller's memory back, still owned.
            BOOST_TEST(back.body.data() == mem.data());
            BOOST_TEST(back.body_offset == kOffset);
            BOOST_TEST(back.body_len == kBody);
            BOOST_TEST(probe.calls.load() == 0);
            back = SendBuffers{};
            BOOST_TEST(probe.calls.load() == 1);
            stream.reset();
            BOOST_REQUIRE(rxtest::drain(ring));
            BOOST_TEST(probe.calls.load() == 1);
        }
    }
}

BOOST_AUTO_TEST_SUITE_END()
