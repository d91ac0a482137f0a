// Host emulator of the CUDA GAE kernel: runs the block algorithm of
// csrc/cuda/gae_scan_block.cuh (the code the GPU runs) with every thread of a block as a
// std::thread. Warp shuffles and __syncthreads are emulated with std::barrier, following
// CUDA's semantics (shfl_down past lane 31 returns the caller's own value). Used by
// tests/test_gae_cuda_host.py; built with g++ -std=c++20 (std::barrier) and optionally
// under AddressSanitizer or ThreadSanitizer.
//
// What this checks: the scan order and combine operators, chunk carries, partial groups
// at sequence edges, idle threads, the aligned/unaligned load and store paths, the mask
// modes, and that the shared-memory protocol has no race (under TSan) and reads nothing
// before it is written (shared memory is poisoned with NaN bytes before each block).
// What it cannot check: nvcc's device code generation, the real shuffle/barrier
// hardware, and memory performance.
//
// Usage: gae_emulator IN OUT. IN (little-endian, packed):
//   int64 N, int64 S, int32 dtype (0 f32, 1 bf16, 2 f16, 3 f64), int32 skip_masked,
//   int32 has_mask, int32 threads, int32 misalign, double gamma,
//   int64 offsets[S+1], rewards[N], values[N] (storage dtype), uint8 mask[N] if has_mask,
//   coef_policy[S], coef_critic[S] (accumulation dtype: f64 for f64, else f32).
// OUT: adv[N], ret[N] in the accumulation dtype. misalign = 1 places every array one
// element past an aligned address, which forces the scalar (unaligned) path.
#include <barrier>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <iterator>
#include <limits>
#include <memory>
#include <stdexcept>
#include <thread>
#include <vector>

#include "cuda/gae_scan_block.cuh"

#if defined(__SANITIZE_ADDRESS__)
#include <sanitizer/asan_interface.h>
#define VAPO_ASAN 1
#else
#define VAPO_ASAN 0
#endif

namespace gb = vapo::gae_block;

namespace {

struct BlockSim {
  explicit BlockSim(int n) : nthreads(n), block_barrier(n), slots(n) {
    for (int w = 0; w < n / gb::kWarp; ++w) {
      warp_barriers.push_back(std::make_unique<std::barrier<>>(gb::kWarp));
    }
  }
  int nthreads;
  std::barrier<> block_barrier;
  std::vector<std::unique_ptr<std::barrier<>>> warp_barriers;
  std::vector<uint64_t> slots;  // one shuffle slot per thread
};

// The emulated counterpart of DeviceCtx in gae_scan.cu.
struct HostCtx {
  BlockSim* block;
  int thread;
  int tid() const { return thread; }
  int nthreads() const { return block->nthreads; }
  void sync() const { block->block_barrier.arrive_and_wait(); }
  template <class T>
  T shfl_down(T x, int d) const {
    const int lane = thread % gb::kWarp;
    return exchange(x, lane + d < gb::kWarp ? lane + d : lane);
  }
  template <class T>
  T shfl(T x, int src) const {
    return exchange(x, src % gb::kWarp);
  }
  // Every lane publishes, the warp meets, every lane reads its source, the warp meets
  // again (so that no slot is overwritten by the next shuffle while still being read).
  template <class T>
  T exchange(T x, int src_lane) const {
    static_assert(sizeof(T) <= 8, "shuffled values are at most 8 bytes");
    const int warp = thread / gb::kWarp;
    uint64_t bits = 0;
    std::memcpy(&bits, &x, sizeof(T));
    block->slots[thread] = bits;
    block->warp_barriers[warp]->arrive_and_wait();
    const uint64_t got = block->slots[warp * gb::kWarp + src_lane];
    block->warp_barriers[warp]->arrive_and_wait();
    T y;
    std::memcpy(&y, &got, sizeof(T));
    return y;
  }
};

template <class S, bool SKIP, bool HAS_MASK>
void run_blocks(const gb::Args<typename gb::Storage<S>::Acc>& args, int64_t num_seqs,
                int threads) {
  using Acc = typename gb::Storage<S>::Acc;
  for (int64_t seq = 0; seq < num_seqs; ++seq) {
    BlockSim sim(threads);
    gb::Shared<Acc> shared;
    std::memset(&shared, 0xff, sizeof(shared));  // NaN bytes: a read-before-write shows
    std::vector<std::thread> pool;
    pool.reserve(threads);
    for (int t = 0; t < threads; ++t) {
      pool.emplace_back([&, t] {
        HostCtx ctx{&sim, t};
        gb::gae_sequence<S, SKIP, HAS_MASK>(ctx, shared, args, seq);
      });
    }
    for (auto& th : pool) th.join();
  }
}

// Mirrors launch_typed in gae_scan.cu.
template <class S>
void launch(const void* r, const void* v, const void* m, const int64_t* offsets, int64_t num_seqs,
            const void* cp, const void* cc, double gamma, bool skip, void* adv, void* ret,
            int threads) {
  const auto args = gb::make_args<S>(r, v, m, offsets, cp, cc, gamma, adv, ret);
  if (threads > gb::max_threads<S>()) threads = gb::max_threads<S>();
  if (m == nullptr) {
    run_blocks<S, true, false>(args, num_seqs, threads);
  } else if (skip) {
    run_blocks<S, true, true>(args, num_seqs, threads);
  } else {
    run_blocks<S, false, true>(args, num_seqs, threads);
  }
}

struct Reader {
  std::vector<char> data;
  size_t pos = 0;
  template <class T>
  T get() {
    T x;
    take(&x, sizeof(T));
    return x;
  }
  void take(void* dst, size_t n) {
    if (pos + n > data.size()) throw std::runtime_error("input file too short");
    std::memcpy(dst, data.data() + pos, n);
    pos += n;
  }
};

// A 64-byte aligned buffer, `shift` bytes past the aligned address, with guard bytes on
// both sides. Under AddressSanitizer the guards are poisoned, so any read or write
// outside [base, base + size) is reported; otherwise writes there are caught by
// guards_intact().
struct Buffer {
  Buffer(size_t bytes, size_t shift_bytes) : storage(bytes + shift_bytes + 128, 0xff) {
    const uintptr_t start = reinterpret_cast<uintptr_t>(storage.data()) + 64;
    base = reinterpret_cast<unsigned char*>(start / 64 * 64) + shift_bytes;
    size = bytes;
    poison(true);
  }
  ~Buffer() { poison(false); }
  Buffer(const Buffer&) = delete;
  Buffer& operator=(const Buffer&) = delete;
  std::vector<unsigned char> storage;
  unsigned char* base;
  size_t size;
  void poison(bool on) const {
#if VAPO_ASAN
    unsigned char* lo = const_cast<unsigned char*>(storage.data());
    unsigned char* hi = base + size;
    unsigned char* end = lo + storage.size();
    if (on) {
      ASAN_POISON_MEMORY_REGION(lo, base - lo);
      ASAN_POISON_MEMORY_REGION(hi, end - hi);
    } else {
      ASAN_UNPOISON_MEMORY_REGION(lo, storage.size());
    }
#else
    (void)on;
#endif
  }
  bool guards_intact() const {
    poison(false);
    bool ok = true;
    for (const unsigned char* p = storage.data(); p < base; ++p) ok &= *p == 0xff;
    for (const unsigned char* p = base + size; p < storage.data() + storage.size(); ++p) {
      ok &= *p == 0xff;
    }
    poison(true);
    return ok;
  }
};

}  // namespace

int main(int argc, char** argv) {
  if (argc != 3) {
    std::fprintf(stderr, "usage: %s IN OUT\n", argv[0]);
    return 2;
  }
  try {
    Reader in;
    {
      std::ifstream f(argv[1], std::ios::binary);
      in.data.assign(std::istreambuf_iterator<char>(f), std::istreambuf_iterator<char>());
    }
    const int64_t n = in.get<int64_t>();
    const int64_t num_seqs = in.get<int64_t>();
    const int32_t dtype = in.get<int32_t>();
    const bool skip = in.get<int32_t>() != 0;
    const bool has_mask = in.get<int32_t>() != 0;
    const int32_t threads = in.get<int32_t>();
    const bool misalign = in.get<int32_t>() != 0;
    const double gamma = in.get<double>();
    if (threads < 32 || threads > 1024 || threads % 32 != 0) throw std::runtime_error("threads");
    const size_t elem = dtype == 3 ? 8 : dtype == 0 ? 4 : 2;
    const size_t acc = dtype == 3 ? 8 : 4;

    std::vector<int64_t> offsets(num_seqs + 1);
    in.take(offsets.data(), offsets.size() * 8);
    Buffer r(n * elem, misalign ? elem : 0), v(n * elem, misalign ? elem : 0);
    Buffer m(has_mask ? n : 0, misalign ? 1 : 0);
    Buffer cp(num_seqs * acc, 0), cc(num_seqs * acc, 0);
    Buffer adv(n * acc, misalign ? acc : 0), ret(n * acc, misalign ? acc : 0);
    in.take(r.base, r.size);
    in.take(v.base, v.size);
    if (has_mask) in.take(m.base, m.size);
    in.take(cp.base, cp.size);
    in.take(cc.base, cc.size);
    if (in.pos != in.data.size()) throw std::runtime_error("input file too long");
    // Outputs start as NaN bytes: a token the kernel fails to write stays NaN.
    std::memset(adv.base, 0xff, adv.size);
    std::memset(ret.base, 0xff, ret.size);

    const void* mp = has_mask ? m.base : nullptr;
    switch (dtype) {
      case 0:
        launch<float>(r.base, v.base, mp, offsets.data(), num_seqs, cp.base, cc.base, gamma, skip,
                      adv.base, ret.base, threads);
        break;
      case 1:
        launch<gb::BFloat16>(r.base, v.base, mp, offsets.data(), num_seqs, cp.base, cc.base, gamma,
                             skip, adv.base, ret.base, threads);
        break;
      case 2:
        launch<gb::Float16>(r.base, v.base, mp, offsets.data(), num_seqs, cp.base, cc.base, gamma,
                            skip, adv.base, ret.base, threads);
        break;
      case 3:
        launch<double>(r.base, v.base, mp, offsets.data(), num_seqs, cp.base, cc.base, gamma, skip,
                       adv.base, ret.base, threads);
        break;
      default:
        throw std::runtime_error("dtype");
    }
    for (const Buffer* b : {&adv, &ret}) {
      if (!b->guards_intact()) throw std::runtime_error("write outside the output arrays");
    }
    std::ofstream out(argv[2], std::ios::binary);
    out.write(reinterpret_cast<const char*>(adv.base), adv.size);
    out.write(reinterpret_cast<const char*>(ret.base), ret.size);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "gae_emulator: %s\n", e.what());
    return 1;
  }
  return 0;
}
