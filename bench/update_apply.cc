// update_apply: time of one server-side update (optimizers::ApplyWithCrc)
// by size, rule and source, on one thread and on the update pool, and of
// the old fp16 path (decode the whole tensor, then apply) beside the fused
// one. Each figure is the best of `reps` timed updates after a warm-up.
//
//   update_apply [--threads N] [--reps R] [--out PATH]
//
// Writes JSON (default bench/results/update_apply.json) and prints a table.
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <string>
#include <vector>

#include "common/thread_pool.h"
#include "optimizers/optimizers.h"
#include "protocol/half.h"

namespace {

using Clock = std::chrono::steady_clock;
using tensorspark::optimizers::Buffers;
using tensorspark::optimizers::Rule;
using tensorspark::optimizers::Source;
using tensorspark::optimizers::Update;

template <typename Fn>
double BestSeconds(int reps, Fn fn) {
  for (int i = 0; i < 3; ++i) fn();
  double best = 1e30;
  for (int i = 0; i < reps; ++i) {
    const auto t0 = Clock::now();
    fn();
    best = std::min(best, std::chrono::duration<double>(Clock::now() - t0).count());
  }
  return best;
}

}  // namespace

int main(int argc, char** argv) {
  size_t threads = 2;
  int reps = 50;
  std::string out = "bench/results/update_apply.json";
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    if (a == "--threads" && i + 1 < argc) {
      threads = static_cast<size_t>(std::atoi(argv[++i]));
    } else if (a == "--reps" && i + 1 < argc) {
      reps = std::atoi(argv[++i]);
    } else if (a == "--out" && i + 1 < argc) {
      out = argv[++i];
    } else {
      std::fprintf(stderr, "usage: %s [--threads N] [--reps R] [--out PATH]\n", argv[0]);
      return 2;
    }
  }
  tensorspark::ThreadPool pool;
  if (!pool.Start(threads).ok()) return 1;
  Update sgd;
  sgd.rule = Rule::kSgd;
  sgd.lr = 0.01f;
  tensorspark::OptimizerConfig adam_config;
  adam_config.kind = tensorspark::OptimizerKind::kAdam;
  const Update adam = tensorspark::optimizers::OptimizerUpdate(adam_config, 0.01f, 1);
  const struct {
    const char* name;
    Update u;
  } rules[] = {{"sgd", sgd}, {"adam", adam}};
  std::FILE* f = std::fopen(out.c_str(), "w");
  if (f == nullptr) {
    std::perror(out.c_str());
    return 1;
  }
  std::fprintf(f, "{\"threads\": %zu, \"reps\": %d, \"cases\": [", threads, reps);
  std::printf("%9s %5s %5s %10s %10s %7s %12s\n", "elements", "rule", "src", "serial_us", "pool_us",
              "speedup", "old_fp16_us");
  bool first = true;
  std::mt19937 gen(1);
  std::normal_distribution<float> dist(0.0f, 1.0f);
  for (size_t n : {size_t{65536}, size_t{131072}, size_t{262144}, size_t{524288}, size_t{1048576},
                   size_t{4194304}}) {
    std::vector<float> w(n), m(n), v(n), g(n), decoded(n);
    std::vector<uint16_t> g16(n);
    for (float& x : g) x = dist(gen);
    tensorspark::protocol::FloatToHalf(g.data(), g16.data(), n);
    for (const auto& r : rules) {
      for (Source src : {Source::kFloat32, Source::kFp16}) {
        const Buffers b{w.data(), m.data(), v.data(), g.data(), g16.data(), src};
        const double serial = BestSeconds(
            reps, [&] { (void)tensorspark::optimizers::ApplyWithCrc(r.u, b, n, nullptr); });
        // parallel_min 0: the pool whatever the size, to find the threshold.
        const double pooled = BestSeconds(
            reps, [&] { (void)tensorspark::optimizers::ApplyWithCrc(r.u, b, n, &pool, 0); });
        double old_fp16 = 0;
        if (src == Source::kFp16) {
          // Before: the whole tensor decoded into float32, then applied.
          const Buffers fb{w.data(), m.data(), v.data(), decoded.data()};
          old_fp16 = BestSeconds(reps, [&] {
            tensorspark::protocol::HalfToFloat(g16.data(), decoded.data(), n);
            (void)tensorspark::optimizers::ApplyWithCrc(r.u, fb, n, &pool, size_t{1} << 20);
          });
        }
        const char* sname = src == Source::kFloat32 ? "fp32" : "fp16";
        std::printf("%9zu %5s %5s %10.1f %10.1f %7.2f %12.1f\n", n, r.name, sname, serial * 1e6,
                    pooled * 1e6, serial / pooled, old_fp16 * 1e6);
        std::fprintf(f,
                     "%s\n  {\"elements\": %zu, \"rule\": \"%s\", \"source\": \"%s\", "
                     "\"serial_us\": %.1f, \"pool_us\": %.1f, \"old_fp16_us\": %.1f}",
                     first ? "" : ",", n, r.name, sname, serial * 1e6, pooled * 1e6,
                     old_fp16 * 1e6);
        first = false;
      }
    }
  }
  std::fprintf(f, "\n]}\n");
  std::fclose(f);
  return 0;
}
