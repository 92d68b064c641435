// Structured outputs' token masks applied to the logits in one pass (CPU):
//
//   token_bitmask_fill(logits [n, V], words int32 [k, W], rows int64 [k]) -> [n, V]
//
// A copy of logits in which row rows[j] holds -inf wherever bit t (word t / 32, bit t % 32) of
// words[j] is clear: the next-token bitmask a grammar matcher writes (llguidance, xgrammar's
// layout), a set bit allowing the token. Rows not named in `rows` are copied as they are. The
// unconstrained rows stay untouched, a constrained row is read once and written once, and whole
// words of allowed (or banned) tokens are a copy (or a fill): torch's unpack-to-bool and masked_fill
// made four passes over [n, V] and an int32 [n, V] temporary (~15 ms a step at vocab 152,064).
// The pure-PyTorch reference (services/executor/ops/reference.py) is what other devices run.
//
//   token_bitmask_fill_(t [n, V], words int32 [k, W], rows int64 [k], value) -> ()
//
// The same masks written in place: t[rows[j], tok] = value wherever the bit is clear, nothing else
// touched (the sampler zeroes the forbidden tokens of a grammar row's softmax this way: one pass over
// that row only, no copy of the batch).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

namespace openlora {
namespace {

template <typename T>
void fill_rows(const T* in, T* out, int64_t n, int64_t vocab, const int32_t* words, int64_t w,
               const std::vector<int64_t>& word_row) {
  const T neg = -std::numeric_limits<T>::infinity();
  at::parallel_for(0, n, 1, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const T* src = in + r * vocab;
      T* dst = out + r * vocab;
      const int64_t j = word_row[r];
      if (j < 0) {
        std::memcpy(dst, src, vocab * sizeof(T));
        continue;
      }
      const uint32_t* mask = reinterpret_cast<const uint32_t*>(words + j * w);
      for (int64_t t0 = 0, i = 0; t0 < vocab; t0 += 32, ++i) {
        const int64_t count = std::min<int64_t>(32, vocab - t0);
        const uint32_t bits = mask[i];
        if (bits == 0xFFFFFFFFu) {
          std::memcpy(dst + t0, src + t0, count * sizeof(T));
        } else if (bits == 0) {
          std::fill(dst + t0, dst + t0 + count, neg);
        } else {
          for (int64_t b = 0; b < count; ++b) dst[t0 + b] = (bits >> b) & 1u ? src[t0 + b] : neg;
        }
      }
    }
  });
}

template <typename T>
void fill_rows_inplace(T* data, int64_t vocab, const int32_t* words, int64_t w, const int64_t* rows,
                       int64_t k, T value) {
  at::parallel_for(0, k, 1, [&](int64_t begin, int64_t end) {
    for (int64_t j = begin; j < end; ++j) {
      T* dst = data + rows[j] * vocab;
      const uint32_t* mask = reinterpret_cast<const uint32_t*>(words + j * w);
      for (int64_t t0 = 0, i = 0; t0 < vocab; t0 += 32, ++i) {
        const int64_t count = std::min<int64_t>(32, vocab - t0);
        const uint32_t bits = mask[i];
        if (bits == 0xFFFFFFFFu) continue;
        if (bits == 0) {
          std::fill(dst + t0, dst + t0 + count, value);
        } else {
          for (int64_t b = 0; b < count; ++b) {
            if (!((bits >> b) & 1u)) dst[t0 + b] = value;
          }
        }
      }
    }
  });
}

// rows checked (an int64 [k] tensor of distinct rows of an [n, ...] tensor) -> its values
std::vector<int64_t> checked_rows(const char* op, const at::Tensor& rows, int64_t n) {
  TORCH_CHECK(rows.dim() == 1 && rows.scalar_type() == at::kLong, op,
              ": rows must be an int64 [k] tensor, got ", rows.scalar_type(), " of shape ", rows.sizes());
  const at::Tensor r = rows.contiguous();
  const int64_t* rp = r.data_ptr<int64_t>();
  std::vector<int64_t> out(rp, rp + r.numel());
  std::vector<char> seen(n, 0);
  for (size_t j = 0; j < out.size(); ++j) {
    TORCH_CHECK(out[j] >= 0 && out[j] < n, op, ": rows[", j, "] = ", out[j], " is not a row of [0, ", n, ")");
    TORCH_CHECK(!seen[out[j]], op, ": row ", out[j], " is named twice in rows");
    seen[out[j]] = 1;
  }
  return out;
}

void token_bitmask_fill_inplace_cpu(const at::Tensor& t, const at::Tensor& words, const at::Tensor& rows,
                                    double value) {
  TORCH_CHECK(t.dim() == 2, "token_bitmask_fill_: t must be 2-D [n, vocab], got shape ", t.sizes());
  TORCH_CHECK(t.is_contiguous(), "token_bitmask_fill_: t must be contiguous (it is written in place)");
  TORCH_CHECK(words.dim() == 2 && words.scalar_type() == at::kInt,
              "token_bitmask_fill_: words must be an int32 [k, ceil(vocab / 32)] tensor, got ",
              words.scalar_type(), " of shape ", words.sizes());
  TORCH_CHECK(t.device().is_cpu() && words.device().is_cpu() && rows.device().is_cpu(),
              "token_bitmask_fill_: t, words and rows must be on the CPU, got ", t.device(), ", ",
              words.device(), ", ", rows.device());
  const int64_t n = t.size(0), vocab = t.size(1);
  const std::vector<int64_t> r = checked_rows("token_bitmask_fill_", rows, n);
  const int64_t k = static_cast<int64_t>(r.size());
  TORCH_CHECK(words.size(0) == k, "token_bitmask_fill_: words has ", words.size(0), " rows but rows names ", k);
  TORCH_CHECK(words.size(1) * 32 >= vocab, "token_bitmask_fill_: words of ", words.size(1), " int32 cover ",
              words.size(1) * 32, " tokens, fewer than the vocab of ", vocab);
  if (k == 0) return;
  const at::Tensor wc = words.contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, t.scalar_type(), "token_bitmask_fill_", [&] {
    fill_rows_inplace<scalar_t>(t.data_ptr<scalar_t>(), vocab, wc.data_ptr<int32_t>(), wc.size(1), r.data(), k,
                                static_cast<scalar_t>(value));
  });
}

at::Tensor token_bitmask_fill_cpu(const at::Tensor& logits, const at::Tensor& words,
                                  const at::Tensor& rows) {
  TORCH_CHECK(logits.dim() == 2, "token_bitmask_fill: logits must be 2-D [n, vocab], got shape ",
              logits.sizes());
  TORCH_CHECK(words.dim() == 2 && words.scalar_type() == at::kInt,
              "token_bitmask_fill: words must be an int32 [k, ceil(vocab / 32)] tensor, got ",
              words.scalar_type(), " of shape ", words.sizes());
  TORCH_CHECK(rows.dim() == 1 && rows.scalar_type() == at::kLong,
              "token_bitmask_fill: rows must be an int64 [k] tensor, got ", rows.scalar_type(),
              " of shape ", rows.sizes());
  TORCH_CHECK(logits.device().is_cpu() && words.device().is_cpu() && rows.device().is_cpu(),
              "token_bitmask_fill: logits, words and rows must be on the CPU, got ", logits.device(),
              ", ", words.device(), ", ", rows.device());
  const int64_t n = logits.size(0), vocab = logits.size(1), k = rows.size(0);
  TORCH_CHECK(words.size(0) == k, "token_bitmask_fill: words has ", words.size(0),
              " rows but rows names ", k);
  TORCH_CHECK(words.size(1) * 32 >= vocab, "token_bitmask_fill: words of ", words.size(1),
              " int32 cover ", words.size(1) * 32, " tokens, fewer than the vocab of ", vocab);
  const at::Tensor r = rows.contiguous();
  const int64_t* rp = r.data_ptr<int64_t>();
  std::vector<int64_t> word_row(n, -1);
  for (int64_t j = 0; j < k; ++j) {
    TORCH_CHECK(rp[j] >= 0 && rp[j] < n, "token_bitmask_fill: rows[", j, "] = ", rp[j],
                " is not a row of logits [0, ", n, ")");
    TORCH_CHECK(word_row[rp[j]] < 0, "token_bitmask_fill: row ", rp[j], " is named twice in rows");
    word_row[rp[j]] = j;
  }
  const at::Tensor in = logits.contiguous();
  const at::Tensor wc = words.contiguous();
  at::Tensor out = at::empty_like(in);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, in.scalar_type(), "token_bitmask_fill", [&] {
    fill_rows<scalar_t>(in.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), n, vocab,
                        wc.data_ptr<int32_t>(), wc.size(1), word_row);
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(openlora, CPU, m) {
  m.impl("token_bitmask_fill", &token_bitmask_fill_cpu);
  m.impl("token_bitmask_fill_", &token_bitmask_fill_inplace_cpu);
}

}  // namespace openlora
