// CPU kernels of the Gaussian rasteriser's `cpp` backend (see
// representations/lib/gaussian_raster_cpp.py for the maths, the shapes and the loader).
//
// forward: per (view, band of rows) task, the view's Gaussians are splatted in depth order
// (front to back) into a per-pixel running transmittance T (float64): for every pixel of a
// Gaussian's box whose T is still >= T_MIN, alpha = min(ALPHA_MAX, o exp(-q / 2)) with
// q = a dx^2 + 2 b dx dy + c dy^2; alpha < ALPHA_MIN is skipped; otherwise
// w = alpha T is added to the pixel's depth and features and T *= 1 - alpha. Visiting the
// Gaussians in depth order keeps every pixel's pairs in depth order without sorting pairs.
// Every composited pair (Gaussian, pixel, T before it) is recorded for the backward pass.
// Work is spent on live pixels only: a bit per pixel (64 columns a word) says T >= T_MIN
// still, so the pixels behind an opaque surface are skipped a word at a time, and a row of a
// box is narrowed to the columns inside the ellipse q <= 2 ln(o / ALPHA_MIN) (with a margin;
// the exact alpha test decides). Each view's Gaussians are first packed in depth order so the
// main loop reads them sequentially.
//
// backward: the recorded pairs of each task, in reverse (back to front for every pixel),
// with the standard 3DGS recursion per pixel: with g_i = dL/dF . f_i + dL/dD z_i,
//   accum_i = sum_{j>i} alpha_j prod_{i<k<j} (1 - alpha_k) g_j   and
//   P_i = prod_{j>i} (1 - alpha_j),
//   dL/dalpha_i = T_i (g_i - accum_i + dL/dA P_i),
// then the chain rule through alpha to the mean, conic and opacity (no division by 1 - alpha).
// Gradients go to a per-task buffer [tasks, N, 7 + C] (u, v, conic a, b, c, opacity, depth,
// features) that the caller sums over the bands of a view.

#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

namespace {

template <typename scalar_t>
struct Splat {
  scalar_t u, v, a, b, c, o, z;
  int32_t x0, y0, x1, y1, g;
  double qs, inv_a;
};

template <typename scalar_t>
struct Pairs {
  std::vector<int32_t> gauss;
  std::vector<int32_t> pixel;
  std::vector<scalar_t> trans;
};

// whether any of the bits [x0, x1) of a row of 64-bit words is set
inline bool any_bits(const uint64_t* row, int64_t x0, int64_t x1) {
  for (int64_t w = x0 / 64; w * 64 < x1; ++w) {
    uint64_t bits = row[w];
    const int64_t lo_bit = std::max<int64_t>(x0 - w * 64, 0);
    const int64_t hi_bit = std::min<int64_t>(x1 - w * 64, 64);
    bits &= (~uint64_t(0)) << lo_bit;
    if (hi_bit < 64) bits &= (uint64_t(1) << hi_bit) - 1;
    if (bits) return true;
  }
  return false;
}

// pairs per task of the previous call: reserving that much saves regrowing the buffers
std::atomic<int64_t> pairs_hint{0};

}  // namespace

std::vector<torch::Tensor> raster_forward(
    torch::Tensor means2d,   // [B, N, 2] contiguous
    torch::Tensor conics,    // [B, N, 3] contiguous
    torch::Tensor opacities, // [N] contiguous
    torch::Tensor depths,    // [B, N] contiguous
    torch::Tensor features,  // [B, N, C] any strides (stride 0 over views allowed)
    torch::Tensor boxes,     // [B, N, 4] int32 (x0, y0, x1, y1), x1/y1 exclusive
    torch::Tensor order,     // [B, K] int64: each view's drawn Gaussians, near to far
    torch::Tensor counts,    // [B] int64: how many entries of order are used per view
    int64_t height, int64_t width, int64_t bands,
    double alpha_min, double alpha_max, double t_min) {
  const int64_t B = means2d.size(0), N = means2d.size(1), C = features.size(2);
  const int64_t K = order.size(1);
  const int64_t tasks = B * bands;
  const int64_t HW = height * width;
  auto opts = means2d.options();
  auto out = torch::zeros({B, height, width, 1 + C}, opts);
  auto tfinal = torch::ones({B, height, width}, opts);
  auto visible = torch::zeros({tasks, N}, opts.dtype(torch::kUInt8));
  auto offsets = torch::zeros({tasks + 1}, opts.dtype(torch::kInt64));
  torch::Tensor gauss_t, pixel_t, trans_t;

  AT_DISPATCH_FLOATING_TYPES(means2d.scalar_type(), "raster_forward", [&] {
    std::vector<Pairs<scalar_t>> pairs(tasks);
    const scalar_t* mp = means2d.data_ptr<scalar_t>();
    const scalar_t* cp = conics.data_ptr<scalar_t>();
    const scalar_t* op = opacities.data_ptr<scalar_t>();
    const scalar_t* zp = depths.data_ptr<scalar_t>();
    const scalar_t* fp = features.data_ptr<scalar_t>();
    const int64_t fsb = features.stride(0), fsn = features.stride(1), fsc = features.stride(2);
    const int32_t* bp = boxes.data_ptr<int32_t>();
    const int64_t* orp = order.data_ptr<int64_t>();
    const int64_t* cnt = counts.data_ptr<int64_t>();
    scalar_t* outp = out.data_ptr<scalar_t>();
    scalar_t* tfp = tfinal.data_ptr<scalar_t>();
    uint8_t* visp = visible.data_ptr<uint8_t>();
    const scalar_t amin = static_cast<scalar_t>(alpha_min);
    const scalar_t amax = static_cast<scalar_t>(alpha_max);
    const int64_t band_rows = (height + bands - 1) / bands;

    const int64_t words = (width + 63) / 64;
    at::parallel_for(0, tasks, 1, [&](int64_t begin, int64_t end) {
      std::vector<double> T(HW);
      // live pixels (T >= t_min) as bits, 64 columns a word: dead pixels cost nothing
      std::vector<uint64_t> alive(height * words);
      std::vector<int32_t> row_alive(height);
      std::vector<Splat<scalar_t>> splats;
      for (int64_t task = begin; task < end; ++task) {
        const int64_t b = task / bands, band = task % bands;
        const int64_t r0 = band * band_rows, r1 = std::min<int64_t>(height, r0 + band_rows);
        if (r0 >= r1) continue;
        std::fill(T.begin(), T.end(), 1.0);
        for (int64_t y = 0; y < height; ++y)
          for (int64_t w = 0; w < words; ++w) {
            const int64_t left = width - w * 64;
            alive[y * words + w] = left >= 64 ? ~uint64_t(0) : ((uint64_t(1) << left) - 1);
          }
        std::fill(row_alive.begin(), row_alive.end(), static_cast<int32_t>(width));
        int64_t rows_alive = r1 - r0;
        Pairs<scalar_t>& pr = pairs[task];
        const int64_t hint = pairs_hint.load(std::memory_order_relaxed);
        pr.gauss.reserve(hint);
        pr.pixel.reserve(hint);
        pr.trans.reserve(hint);
        scalar_t* img = outp + b * HW * (1 + C);
        uint8_t* vis = visp + task * N;
        // this view's Gaussians touching the band, near to far, packed so the main loop
        // reads them in order (gathering them there costs a cache miss each)
        const int64_t n = cnt[b];
        splats.clear();
        for (int64_t k = 0; k < n; ++k) {
          const int64_t g = orp[b * K + k];
          const int32_t* box = bp + (b * N + g) * 4;
          if (box[1] >= r1 || box[3] <= r0 || box[0] >= box[2] || box[1] >= box[3]) continue;
          Splat<scalar_t> sp;
          sp.u = mp[(b * N + g) * 2];
          sp.v = mp[(b * N + g) * 2 + 1];
          sp.a = cp[(b * N + g) * 3];
          sp.b = cp[(b * N + g) * 3 + 1];
          sp.c = cp[(b * N + g) * 3 + 2];
          sp.o = op[g];
          sp.z = zp[b * N + g];
          sp.x0 = box[0];
          sp.x1 = box[2];
          sp.y0 = static_cast<int32_t>(std::max<int64_t>(box[1], r0));
          sp.y1 = static_cast<int32_t>(std::min<int64_t>(box[3], r1));
          sp.g = static_cast<int32_t>(g);
          // alpha >= alpha_min only where q <= 2 ln(o / alpha_min): per row, the columns
          // solving a dx^2 + 2 b dy dx + c dy^2 <= qmax (with slack: the test decides)
          const double qmax = 2.0 * std::log(static_cast<double>(sp.o) / alpha_min);
          sp.qs = qmax * 1.01 + 0.05;
          const bool ellipse = sp.a > 0 && qmax > 0 && std::isfinite(qmax);
          sp.inv_a = ellipse ? 1.0 / static_cast<double>(sp.a) : 0.0;
          splats.push_back(sp);
        }
        for (size_t k = 0; k < splats.size() && rows_alive > 0; ++k) {
          const Splat<scalar_t>& sp = splats[k];
          const int64_t g = sp.g;
          const int64_t y0 = sp.y0, y1 = sp.y1, bx0 = sp.x0, bx1 = sp.x1;
          const scalar_t u = sp.u, v = sp.v, ca = sp.a, cb = sp.b, cc = sp.c, o = sp.o, z = sp.z;
          const scalar_t* f = fp + b * fsb + g * fsn;
          const double db = cb, dc = cc, qs = sp.qs, inv_a = sp.inv_a;
          const bool ellipse = inv_a > 0;
          for (int64_t y = y0; y < y1; ++y) {
            if (row_alive[y] == 0) continue;
            const scalar_t dy = static_cast<scalar_t>(y) + scalar_t(0.5) - v;
            int64_t x0 = bx0, x1 = bx1;
            uint64_t* row_bits = alive.data() + y * words;
            if (!any_bits(row_bits, x0, x1)) continue;   // the box's row is dead already
            if (ellipse) {
              const double ddy = dy;
              const double disc = db * db * ddy * ddy - (dc * ddy * ddy - qs) / inv_a;
              if (disc < 0) continue;
              const double root = std::sqrt(disc);
              const double lo = std::ceil(u + (-db * ddy - root) * inv_a - 0.5) - 1.0;
              const double hi = std::floor(u + (-db * ddy + root) * inv_a - 0.5) + 2.0;
              if (lo > static_cast<double>(x0)) x0 = std::min<int64_t>(x1, (int64_t)lo);
              if (hi < static_cast<double>(x1)) x1 = std::max<int64_t>(x0, (int64_t)hi);
              if (x0 >= x1) continue;
            }
            for (int64_t w = x0 / 64; w * 64 < x1; ++w) {
              uint64_t bits = row_bits[w];
              const int64_t lo_bit = std::max<int64_t>(x0 - w * 64, 0);
              const int64_t hi_bit = std::min<int64_t>(x1 - w * 64, 64);
              bits &= (~uint64_t(0)) << lo_bit;
              if (hi_bit < 64) bits &= (uint64_t(1) << hi_bit) - 1;
              while (bits) {
                const int64_t x = w * 64 + __builtin_ctzll(bits);
                bits &= bits - 1;
                const int64_t p = y * width + x;
                const double t = T[p];
                const scalar_t dx = static_cast<scalar_t>(x) + scalar_t(0.5) - u;
                const scalar_t q = ca * dx * dx + scalar_t(2) * cb * dx * dy + cc * dy * dy;
                scalar_t alpha = o * std::exp(scalar_t(-0.5) * q);
                if (alpha > amax) alpha = amax;
                if (!(alpha >= amin)) continue;
                const scalar_t wt = alpha * static_cast<scalar_t>(t);
                scalar_t* px = img + p * (1 + C);
                px[0] += wt * z;
                for (int64_t c = 0; c < C; ++c) px[1 + c] += wt * f[c * fsc];
                pr.gauss.push_back(static_cast<int32_t>(g));
                pr.pixel.push_back(static_cast<int32_t>(p));
                pr.trans.push_back(static_cast<scalar_t>(t));
                vis[g] = 1;
                const double tn = t * (1.0 - static_cast<double>(alpha));
                T[p] = tn;
                if (tn < t_min) {
                  row_bits[w] &= ~(uint64_t(1) << (x - w * 64));
                  if (--row_alive[y] == 0) --rows_alive;
                }
              }
            }
          }
        }
        for (int64_t y = r0; y < r1; ++y)
          for (int64_t x = 0; x < width; ++x)
            tfp[b * HW + y * width + x] = static_cast<scalar_t>(T[y * width + x]);
      }
    });

    int64_t* off = offsets.data_ptr<int64_t>();
    for (int64_t t = 0; t < tasks; ++t) off[t + 1] = off[t] + (int64_t)pairs[t].gauss.size();
    const int64_t M = off[tasks];
    pairs_hint.store(tasks > 0 ? M / tasks + M / tasks / 4 : 0, std::memory_order_relaxed);
    gauss_t = torch::empty({M}, opts.dtype(torch::kInt32));
    pixel_t = torch::empty({M}, opts.dtype(torch::kInt32));
    trans_t = torch::empty({M}, opts);
    for (int64_t t = 0; t < tasks; ++t) {
      const size_t m = pairs[t].gauss.size();
      if (m == 0) continue;
      std::memcpy(gauss_t.data_ptr<int32_t>() + off[t], pairs[t].gauss.data(), m * 4);
      std::memcpy(pixel_t.data_ptr<int32_t>() + off[t], pairs[t].pixel.data(), m * 4);
      std::memcpy(trans_t.data_ptr<scalar_t>() + off[t], pairs[t].trans.data(),
                  m * sizeof(scalar_t));
    }
  });
  return {out, tfinal, visible, gauss_t, pixel_t, trans_t, offsets};
}

torch::Tensor raster_backward(
    torch::Tensor means2d, torch::Tensor conics, torch::Tensor opacities,
    torch::Tensor depths, torch::Tensor features,
    torch::Tensor gauss, torch::Tensor pixel, torch::Tensor trans, torch::Tensor offsets,
    torch::Tensor tfinal,       // [B, H, W]
    torch::Tensor grad_out,     // [B, H, W, 1 + C] contiguous (depth, features)
    torch::Tensor grad_alpha,   // [B, H, W] contiguous
    int64_t height, int64_t width, int64_t bands, double alpha_max) {
  const int64_t B = means2d.size(0), N = means2d.size(1), C = features.size(2);
  const int64_t tasks = B * bands;
  const int64_t HW = height * width;
  const int64_t G = 7 + C;
  auto grads = torch::zeros({tasks, N, G}, means2d.options());

  AT_DISPATCH_FLOATING_TYPES(means2d.scalar_type(), "raster_backward", [&] {
    const scalar_t* mp = means2d.data_ptr<scalar_t>();
    const scalar_t* cp = conics.data_ptr<scalar_t>();
    const scalar_t* op = opacities.data_ptr<scalar_t>();
    const scalar_t* zp = depths.data_ptr<scalar_t>();
    const scalar_t* fp = features.data_ptr<scalar_t>();
    const int64_t fsb = features.stride(0), fsn = features.stride(1), fsc = features.stride(2);
    const int32_t* gp = gauss.data_ptr<int32_t>();
    const int32_t* pp = pixel.data_ptr<int32_t>();
    const scalar_t* tp = trans.data_ptr<scalar_t>();
    const int64_t* off = offsets.data_ptr<int64_t>();
    const scalar_t* tfp = tfinal.data_ptr<scalar_t>();
    const scalar_t* gop = grad_out.data_ptr<scalar_t>();
    const scalar_t* gap = grad_alpha.data_ptr<scalar_t>();
    scalar_t* grp = grads.data_ptr<scalar_t>();
    const scalar_t amax = static_cast<scalar_t>(alpha_max);

    at::parallel_for(0, tasks, 1, [&](int64_t begin, int64_t end) {
      std::vector<scalar_t> accum(HW), prod(HW);
      for (int64_t task = begin; task < end; ++task) {
        if (off[task + 1] == off[task]) continue;
        const int64_t b = task / bands;
        std::fill(accum.begin(), accum.end(), scalar_t(0));
        std::fill(prod.begin(), prod.end(), scalar_t(1));
        const scalar_t* go = gop + b * HW * (1 + C);
        const scalar_t* ga = gap + b * HW;
        scalar_t* gr = grp + task * N * G;
        for (int64_t i = off[task + 1] - 1; i >= off[task]; --i) {
          const int64_t g = gp[i], p = pp[i];
          const scalar_t t = tp[i];
          const scalar_t u = mp[(b * N + g) * 2], v = mp[(b * N + g) * 2 + 1];
          const scalar_t ca = cp[(b * N + g) * 3], cb = cp[(b * N + g) * 3 + 1],
                         cc = cp[(b * N + g) * 3 + 2];
          const scalar_t o = op[g], z = zp[b * N + g];
          const scalar_t* f = fp + b * fsb + g * fsn;
          const scalar_t dx = static_cast<scalar_t>(p % width) + scalar_t(0.5) - u;
          const scalar_t dy = static_cast<scalar_t>(p / width) + scalar_t(0.5) - v;
          const scalar_t q = ca * dx * dx + scalar_t(2) * cb * dx * dy + cc * dy * dy;
          const scalar_t e = std::exp(scalar_t(-0.5) * q);
          const scalar_t raw = o * e;
          const scalar_t alpha = raw > amax ? amax : raw;
          const scalar_t w = alpha * t;
          const scalar_t* gpx = go + p * (1 + C);
          scalar_t* gg = gr + g * G;
          scalar_t gdot = gpx[0] * z;
          gg[6] += w * gpx[0];
          for (int64_t c = 0; c < C; ++c) {
            const scalar_t fc = f[c * fsc];
            gdot += gpx[1 + c] * fc;
            gg[7 + c] += w * gpx[1 + c];
          }
          const scalar_t dalpha = t * (gdot - accum[p] + ga[p] * prod[p]);
          accum[p] = alpha * gdot + (scalar_t(1) - alpha) * accum[p];
          prod[p] *= scalar_t(1) - alpha;
          if (raw <= amax) {
            const scalar_t dq = dalpha * scalar_t(-0.5) * raw;
            gg[5] += dalpha * e;
            gg[0] -= dq * scalar_t(2) * (ca * dx + cb * dy);
            gg[1] -= dq * scalar_t(2) * (cb * dx + cc * dy);
            gg[2] += dq * dx * dx;
            gg[3] += dq * scalar_t(2) * dx * dy;
            gg[4] += dq * dy * dy;
          }
        }
      }
    });
  });
  return grads;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("forward", &raster_forward, "Gaussian rasteriser forward (CPU)");
  m.def("backward", &raster_backward, "Gaussian rasteriser backward (CPU)");
}
