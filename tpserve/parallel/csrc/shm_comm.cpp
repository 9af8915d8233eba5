// Shared-memory collectives for the ranks of one host (see tpserve/parallel/shm.py).
//
// One mapped segment per group: a cache line of state per rank (the number of the last round it
// published, its pid), then two slots per rank. A round is: copy my bytes into my slot, publish
// the round number (release), wait until every peer published it (acquire), read the peers'
// slots. Rounds alternate between the two slots; a rank reaches round k+2, and overwrites the
// slot of round k, only after every peer published round k+1, which each does only after it
// finished reading round k. Sums run in rank order on every rank, so all ranks get the same bits.
//
// Only raw pointers cross this boundary (no torch headers: the module builds in seconds).

#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <atomic>
#include <cerrno>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <stdexcept>
#include <string>
#include <vector>

#include <sched.h>
#include <signal.h>
#include <time.h>
#include <unistd.h>

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
static inline void cpu_relax() { _mm_pause(); }
#elif defined(__aarch64__)
static inline void cpu_relax() { asm volatile("yield" ::: "memory"); }
#else
static inline void cpu_relax() {}
#endif

namespace py = pybind11;

namespace {

struct alignas(64) RankState {
  std::atomic<uint64_t> round;
  int64_t pid;
};
static_assert(sizeof(RankState) == 64, "one cache line per rank");

enum Dtype { F32 = 0, BF16 = 1, F16 = 2 };

inline float bf16_to_f32(uint16_t h) {
  uint32_t bits = static_cast<uint32_t>(h) << 16;
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

inline uint16_t f32_to_bf16(float f) {  // round to nearest even, as torch does
  uint32_t bits;
  std::memcpy(&bits, &f, 4);
  const uint32_t rounded = (bits + 0x7fffu + ((bits >> 16) & 1u)) >> 16;
  const uint32_t nan = (bits >> 16) | 0x40u;  // NaN stays NaN; a select, not a branch, so loops vectorize
  return static_cast<uint16_t>((bits & 0x7fffffffu) > 0x7f800000u ? nan : rounded);
}

inline float f16_to_f32(uint16_t h) {
  uint32_t sign = (h & 0x8000u) << 16, exp = (h >> 10) & 0x1fu, mant = h & 0x3ffu, bits;
  if (exp == 0) {
    if (mant == 0) {
      bits = sign;
    } else {  // subnormal: normalise
      exp = 1;
      while (!(mant & 0x400u)) { mant <<= 1; --exp; }
      mant &= 0x3ffu;
      bits = sign | ((exp + 112) << 23) | (mant << 13);
    }
  } else if (exp == 31) {
    bits = sign | 0x7f800000u | (mant << 13);
  } else {
    bits = sign | ((exp + 112) << 23) | (mant << 13);
  }
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

inline uint16_t f32_to_f16(float f) {  // round to nearest even
  uint32_t bits;
  std::memcpy(&bits, &f, 4);
  uint32_t sign = (bits >> 16) & 0x8000u;
  uint32_t abs = bits & 0x7fffffffu;
  if (abs > 0x7f800000u) return static_cast<uint16_t>(sign | 0x7e00u);
  if (abs >= 0x477ff000u) return static_cast<uint16_t>(sign | 0x7c00u);  // overflow to inf
  if (abs < 0x38800000u) {  // subnormal or zero
    if (abs < 0x33000000u) return static_cast<uint16_t>(sign);
    uint32_t exp = abs >> 23, mant = (abs & 0x7fffffu) | 0x800000u;
    uint32_t shift = 126 - exp;  // 14 + (113 - exp) - 1
    uint32_t half = mant >> shift, rem = mant & ((1u << shift) - 1), mid = 1u << (shift - 1);
    if (rem > mid || (rem == mid && (half & 1u))) ++half;
    return static_cast<uint16_t>(sign | half);
  }
  uint32_t r = abs - 0x38000000u;  // rebias exponent
  r += 0xfffu + ((r >> 13) & 1u);
  return static_cast<uint16_t>(sign | (r >> 13));
}

// A peer that exited is gone, or a zombie until its parent reaps it: both count as dead.
bool alive(int64_t pid) {
  if (kill(static_cast<pid_t>(pid), 0) != 0 && errno == ESRCH) return false;
  char path[64];
  std::snprintf(path, sizeof(path), "/proc/%lld/stat", static_cast<long long>(pid));
  FILE* f = std::fopen(path, "r");
  if (!f) return true;  // no /proc: trust kill()
  char buf[512];
  const size_t n = std::fread(buf, 1, sizeof(buf) - 1, f);
  std::fclose(f);
  buf[n] = 0;
  const char* close = std::strrchr(buf, ')');
  return !(close && close[1] == ' ' && (close[2] == 'Z' || close[2] == 'X'));
}

#if defined(__AVX512F__) && defined(__AVX512BW__)
inline __m512 load_bf16(const uint16_t* p) {
  const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

inline __m256i round_bf16(__m512 v) {  // f32_to_bf16 on 16 lanes
  const __m512i bits = _mm512_castps_si512(v);
  const __m512i odd = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
  const __m512i rounded = _mm512_srli_epi32(_mm512_add_epi32(bits, _mm512_add_epi32(odd, _mm512_set1_epi32(0x7fff))), 16);
  const __m512i nan = _mm512_or_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(0x40));
  const __mmask16 is_nan = _mm512_cmpgt_epu32_mask(_mm512_and_si512(bits, _mm512_set1_epi32(0x7fffffff)),
                                                   _mm512_set1_epi32(0x7f800000));
  return _mm512_cvtepi32_epi16(_mm512_mask_mov_epi32(rounded, is_nan, nan));
}
#endif

// Sums 16-bit slots into ``out`` in float, rank by rank: a scalar loop spent ~145 us on a
// prefill's 128 x 576 bf16 sum at TP = 2; 16 lanes at a time it is a small part of the round.
// Each element's sum runs in rank order, so every rank gets the same bits.
void sum_halves(const std::vector<const char*>& slots, uint16_t* out, int64_t n, bool bf) {
  const size_t world = slots.size();
  auto slot = [&](size_t j) { return reinterpret_cast<const uint16_t*>(slots[j]); };
  int64_t i = 0;
#if defined(__AVX512F__) && defined(__AVX512BW__)
  if (bf) {
    for (; i + 16 <= n; i += 16) {
      __m512 acc = load_bf16(slot(0) + i);
      for (size_t j = 1; j < world; ++j) acc = _mm512_add_ps(acc, load_bf16(slot(j) + i));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + i), round_bf16(acc));
    }
  }
#endif
  for (; i < n; ++i) {
    float acc = bf ? bf16_to_f32(slot(0)[i]) : f16_to_f32(slot(0)[i]);
    for (size_t j = 1; j < world; ++j) acc += bf ? bf16_to_f32(slot(j)[i]) : f16_to_f32(slot(j)[i]);
    out[i] = bf ? f32_to_bf16(acc) : f32_to_f16(acc);
  }
}

class Comm {
 public:
  Comm(uintptr_t base, int rank, int world, int64_t slot_bytes, int64_t spins)
      : state_(reinterpret_cast<RankState*>(base)),
        data_(reinterpret_cast<char*>(base) + 64 * world),
        rank_(rank), world_(world), slot_(slot_bytes), spins_(spins) {
    round_ = state_[rank].round.load(std::memory_order_relaxed);
    state_[rank].pid = static_cast<int64_t>(getpid());
  }

  static int64_t header_bytes(int world) { return 64 * static_cast<int64_t>(world); }

  void all_reduce(uintptr_t ptr, int64_t numel, int dtype, double timeout_s) {
    const int64_t elem = dtype == F32 ? 4 : 2;
    const int64_t per_round = slot_ / elem;
    char* data = reinterpret_cast<char*>(ptr);
    for (int64_t off = 0; off < numel; off += per_round) {
      const int64_t n = std::min(per_round, numel - off);
      const int parity = publish_after([&](char* mine) { std::memcpy(mine, data + off * elem, n * elem); }, timeout_s);
      std::vector<const char*> slots(world_);
      for (int j = 0; j < world_; ++j) slots[j] = slot(j, parity);
      if (dtype == F32) {
        float* out = reinterpret_cast<float*>(data) + off;
        const float* s0 = reinterpret_cast<const float*>(slots[0]);
        for (int64_t i = 0; i < n; ++i) out[i] = s0[i];
        for (int j = 1; j < world_; ++j) {
          const float* s = reinterpret_cast<const float*>(slots[j]);
          for (int64_t i = 0; i < n; ++i) out[i] += s[i];
        }
      } else {
        sum_halves(slots, reinterpret_cast<uint16_t*>(data) + off, n, dtype == BF16);
      }
    }
  }

  // Every rank's ``sizes[r]`` bytes, concatenated in rank order into ``out`` (rank ``dst`` only,
  // or every rank when dst < 0).
  void all_gather(uintptr_t in, const std::vector<int64_t>& sizes, uintptr_t out, int dst, double timeout_s) {
    int64_t biggest = 0;
    std::vector<int64_t> at(world_, 0);
    for (int j = 0; j < world_; ++j) {
      biggest = std::max(biggest, sizes[j]);
      if (j) at[j] = at[j - 1] + sizes[j - 1];
    }
    const char* src = reinterpret_cast<const char*>(in);
    char* dest = reinterpret_cast<char*>(out);
    const bool copy_out = dst < 0 || dst == rank_;
    for (int64_t off = 0; off < std::max<int64_t>(biggest, 1); off += slot_) {
      const int64_t mine = std::max<int64_t>(0, std::min(slot_, sizes[rank_] - off));
      const int parity = publish_after([&](char* slot) { std::memcpy(slot, src + off, mine); }, timeout_s);
      if (!copy_out) continue;
      for (int j = 0; j < world_; ++j) {
        const int64_t n = std::max<int64_t>(0, std::min(slot_, sizes[j] - off));
        if (n) std::memcpy(dest + at[j] + off, slot(j, parity), n);
      }
    }
  }

  void broadcast(uintptr_t ptr, int64_t nbytes, int src, double timeout_s) {
    char* data = reinterpret_cast<char*>(ptr);
    for (int64_t off = 0; off < std::max<int64_t>(nbytes, 1); off += slot_) {
      const int64_t n = std::max<int64_t>(0, std::min(slot_, nbytes - off));
      const int parity = publish_after([&](char* slot) {
        if (rank_ == src) std::memcpy(slot, data + off, n);
      }, timeout_s);
      if (rank_ != src && n) std::memcpy(data + off, slot(src, parity), n);
    }
  }

  void barrier(double timeout_s) { publish_after([](char*) {}, timeout_s); }

 private:
  char* slot(int rank, int parity) const { return data_ + (static_cast<int64_t>(rank) * 2 + parity) * slot_; }

  // One round: ``fill`` my slot, publish, wait for every peer; returns the round's slot parity.
  template <typename Fill>
  int publish_after(Fill fill, double timeout_s) {
    const uint64_t k = ++round_;
    const int parity = static_cast<int>(k & 1);
    fill(slot(rank_, parity));
    state_[rank_].round.store(k, std::memory_order_release);
    wait_all(k, timeout_s);
    return parity;
  }

  void wait_all(uint64_t k, double timeout_s) {
    using clock = std::chrono::steady_clock;
    clock::time_point start{}, next_check{};
    bool timing = false;
    for (int j = 0; j < world_; ++j) {
      if (j == rank_) continue;
      int64_t n = 0;
      while (state_[j].round.load(std::memory_order_acquire) < k) {
        if (++n <= spins_) {
          cpu_relax();
          continue;
        }
        // Past the spin budget: let a peer that shares our core run, and look at the clock.
        if (!timing) {
          timing = true;
          start = clock::now();
          next_check = start;
        }
        sched_yield();
        const auto now = clock::now();
        const double waited = std::chrono::duration<double>(now - start).count();
        if (waited > 0.001) {  // a long wait: sleep in naps instead of yielding hot. Past 20 ms
          // (a busy engine's ranks wait far less for each other and for commands) naps grow to
          // 1 ms: 50 us naps for a whole second made an idle engine's workers wake 20,000 times
          // a second on the cores another engine in the same process was computing on
          struct timespec nap = {0, waited > 0.02 ? 1000000 : 50000};
          nanosleep(&nap, nullptr);
        }
        if (now < next_check) continue;
        next_check = now + std::chrono::milliseconds(2);
        const int64_t pid = state_[j].pid;
        if (pid > 0 && !alive(pid))
          throw std::runtime_error("dead:" + std::to_string(j) + ":" + std::to_string(pid));
        if (waited > timeout_s)
          throw std::runtime_error("timeout:" + std::to_string(j) + ":" + std::to_string(waited));
      }
    }
  }

  RankState* state_;
  char* data_;
  int rank_, world_;
  int64_t slot_, spins_;
  uint64_t round_ = 0;
};

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  py::class_<Comm>(m, "Comm")
      .def(py::init<uintptr_t, int, int, int64_t, int64_t>())
      .def_static("header_bytes", &Comm::header_bytes)
      .def("all_reduce", &Comm::all_reduce, py::call_guard<py::gil_scoped_release>())
      .def("all_gather", &Comm::all_gather, py::call_guard<py::gil_scoped_release>())
      .def("broadcast", &Comm::broadcast, py::call_guard<py::gil_scoped_release>())
      .def("barrier", &Comm::barrier, py::call_guard<py::gil_scoped_release>());
}
