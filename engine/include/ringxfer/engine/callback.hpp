// Callback: a move-only function wrapper that keeps its target inline.
//
// Every operation carries a completion handler, and handlers usually capture
// a shared_ptr to their connection (16 bytes, not trivially copyable). That
// is enough for std::function to allocate: libstdc++ keeps only trivially
// copyable targets of up to 16 bytes inline. A 64-byte echo paid three such
// allocations per frame on each side (docs/design.md, "No heap allocation
// per frame"). Callback stores any nothrow-movable target of up to `Inline`
// bytes in place and falls back to the heap only for larger ones; it is
// move-only, so a handler may own move-only state (a Lease, a Frame).
//
// Like std::move_only_function (C++23, which does not let us choose the
// inline size): call it through a non-const object; an empty Callback must
// not be called.
#pragma once

#include <cstddef>
#include <functional>
#include <new>
#include <type_traits>
#include <utility>

namespace ringxfer::engine {

template <class Signature, std::size_t Inline = 48>
class Callback;

namespace detail {
template <class T>
inline constexpr bool is_std_function_v = false;
template <class S>
inline constexpr bool is_std_function_v<std::function<S>> = true;
}  // namespace detail

template <class R, class... Args, std::size_t Inline>
class Callback<R(Args...), Inline> {
public:
    static constexpr std::size_t kInlineBytes = Inline;

    Callback() noexcept = default;
    Callback(std::nullptr_t) noexcept {}

    template <class F>
        requires(!std::is_same_v<std::remove_cvref_t<F>, Callback> &&
                 !std::is_same_v<std::remove_cvref_t<F>, std::nullptr_t> &&
                 std::is_invocable_r_v<R, std::remove_cvref_t<F>&, Args...>)
    Callback(F&& f) {  // NOLINT: implicit, like std::function
        using T = std::remove_cvref_t<F>;
        if constexpr (std::is_pointer_v<T> || std::is_member_pointer_v<T> || is_std_function<T>) {
            if (f == nullptr) return;  // a null pointer or empty std::function: empty
        }
        if constexpr (stored_inline<T>()) {
            ::new (static_cast<void*>(storage_)) T(std::forward<F>(f));
            ops_ = &inline_ops<T>;
        } else {
            *reinterpret_cast<T**>(storage_) = new T(std::forward<F>(f));
            ops_ = &heap_ops<T>;
        }
    }

    Callback(Callback&& other) noexcept { take(other); }
    Callback& operator=(Callback&& other) noexcept {
        if (this != &other) {
            reset();
            take(other);
        }
        return *this;
    }
    Callback& operator=(std::nullptr_t) noexcept {
        reset();
        return *this;
    }
    Callback(const Callback&) = delete;
    Callback& operator=(const Callback&) = delete;
    ~Callback() { reset(); }

    explicit operator bool() const noexcept { return ops_ != nullptr; }
    friend bool operator==(const Callback& c, std::nullptr_t) noexcept { return !c; }

    R operator()(Args... args) { return ops_->invoke(storage_, std::forward<Args>(args)...); }

    void reset() noexcept {
        if (ops_) {
            ops_->destroy(storage_);
            ops_ = nullptr;
        }
    }

    /// True when a target of type T lives inside the Callback (no allocation).
    template <class T>
    static constexpr bool stored_inline() noexcept {
        return sizeof(T) <= Inline && alignof(T) <= alignof(std::max_align_t) &&
               std::is_nothrow_move_constructible_v<T>;
    }

private:
    template <class T>
    static constexpr bool is_std_function = detail::is_std_function_v<T>;

    struct Ops {
        R (*invoke)(void* storage, Args&&... args);
        void (*relocate)(void* from, void* to) noexcept;  // move to `to`, destroy `from`
        void (*destroy)(void* storage) noexcept;
    };

    template <class T>
    static constexpr Ops inline_ops = {
        [](void* s, Args&&... args) -> R {
            return std::invoke(*std::launder(static_cast<T*>(s)), std::forward<Args>(args)...);
        },
        [](void* from, void* to) noexcept {
            T* f = std::launder(static_cast<T*>(from));
            ::new (to) T(std::move(*f));
            f->~T();
        },
        [](void* s) noexcept { std::launder(static_cast<T*>(s))->~T(); },
    };

    template <class T>
    static constexpr Ops heap_ops = {
        [](void* s, Args&&... args) -> R {
            return std::invoke(**static_cast<T**>(s), std::forward<Args>(args)...);
        },
        [](void* from, void* to) noexcept { *static_cast<T**>(to) = *static_cast<T**>(from); },
        [](void* s) noexcept { delete *static_cast<T**>(s); },
    };

    void take(Callback& other) noexcept {
        if (other.ops_) {
            other.ops_->relocate(other.storage_, storage_);
            ops_ = std::exchange(other.ops_, nullptr);
        }
    }

    alignas(std::max_align_t) std::byte storage_[Inline < sizeof(void*) ? sizeof(void*) : Inline];
    const Ops* ops_ = nullptr;
};

}  // namespace ringxfer::engine
