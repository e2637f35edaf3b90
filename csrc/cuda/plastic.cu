#include "cuda/common.cuh"
#include "cuda/plastic.h"

namespace neuronml_fast::cuda {

namespace {

constexpr int kThreads = kPlasticRowsPerBlock * 32;

template <typename T> __device__ __forceinline__ T activation(T z, bool tanh_act) {
  return tanh_act ? tanh(z) : z;
}

template <typename T>
__device__ __forceinline__ T modulation_of(const PlasticStep& s, const T* mod, int64_t b, int64_t j) {
  return s.per_neuron ? mod[(s.t * s.B + b) * s.OUT + j] : mod[s.t * s.B + b];
}

template <typename T>
__device__ __forceinline__ T update(const PlasticStep& s, T h, T p, T y, T eta, T m, T clip, bool clamp) {
  T next = s.rule == PlasticRule::kHebb ? (T(1) - eta) * h + eta * y * p
         : s.rule == PlasticRule::kOja ? h + eta * y * (p - y * h)
                       : h + m * y * p;
  if (clamp) next = next < -clip ? -clip : (next > clip ? clip : next);
  return next;
}

// Forward step: warp per row j of sequence b.
template <typename T>
__global__ void __launch_bounds__(kThreads)
forward_step_kernel(PlasticStep s, const T* __restrict__ x, const T* __restrict__ weight, const T* __restrict__ alpha,
                    const T* __restrict__ eta_ptr, const T* __restrict__ clip_ptr, const T* __restrict__ bias,
                    const T* __restrict__ drive, const T* __restrict__ pre, const T* __restrict__ mod,
                    T* __restrict__ trace, T* __restrict__ output, bool update_only) {
  const int lane = threadIdx.x & 31;
  const int64_t b = blockIdx.x, j = static_cast<int64_t>(blockIdx.y) * kPlasticRowsPerBlock + (threadIdx.x >> 5);
  if (j >= s.OUT) return;
  const T eta = *eta_ptr, clip = *clip_ptr;
  const T* p = pre + b * s.IN;
  T* h = trace + (b * s.OUT + j) * s.IN;
  const int64_t row = (s.t * s.B + b) * s.OUT + j;
  T y;
  if (update_only) {
    y = output[row];
  } else {
    T z = T(0);
    for (int64_t i = lane; i < s.IN; i += 32) {
      const T a = s.alpha_scalar ? alpha[0] : alpha[j * s.IN + i];
      z += (weight[j * s.IN + i] + a * h[i]) * p[i];
    }
    z = warp_all_sum(z);
    if (s.recurrent) {
      z += x[row];
    } else {
      if (s.has_bias) z += bias[j];
      if (s.has_drive) z += drive[row];
    }
    y = activation(z, s.tanh);
    if (lane == 0) output[row] = y;
  }
  const T m = s.rule == PlasticRule::kModulated ? modulation_of(s, mod, b, j) : T(0);
  for (int64_t i = lane; i < s.IN; i += 32) h[i] = update(s, h[i], p[i], y, eta, m, clip, s.has_clip);
}

// Reverse step for a block of rows of sequence b: rows first (warp per row), then columns.
template <typename T>
__global__ void __launch_bounds__(kThreads)
backward_step_kernel(PlasticStep s, const T* __restrict__ weight, const T* __restrict__ alpha,
                     const T* __restrict__ eta_ptr, const T* __restrict__ clip_ptr, const T* __restrict__ pre,
                     const T* __restrict__ output, const T* __restrict__ grad_output, const T* __restrict__ carry,
                     const T* __restrict__ mod, T* __restrict__ h_all, T* __restrict__ gh_all, T* __restrict__ grad_z,
                     T* __restrict__ gpre_part, T* __restrict__ galpha_part, T* __restrict__ geta_part,
                     T* __restrict__ gmod_rows, bool reconstruct) {
  __shared__ T gz_s[kPlasticRowsPerBlock], y_s[kPlasticRowsPerBlock], m_s[kPlasticRowsPerBlock];
  __shared__ T red_eta[kThreads], red_alpha[kThreads];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int64_t b = blockIdx.x, blk = blockIdx.y, blocks = gridDim.y;
  const int64_t j0 = blk * kPlasticRowsPerBlock;
  const T eta = *eta_ptr, clip = *clip_ptr;
  const T* p = pre + b * s.IN;

  // Rows: H_t (reconstructed in place), the clip mask on dL/dH', the rule's share of dL/dy.
  const int64_t j = j0 + warp;
  if (j < s.OUT) {
    const int64_t row = (s.t * s.B + b) * s.OUT + j;
    const T y = output[row];
    const T m = s.rule == PlasticRule::kModulated ? modulation_of(s, mod, b, j) : T(0);
    T* h = h_all + (b * s.OUT + j) * s.IN;
    T* gh = gh_all + (b * s.OUT + j) * s.IN;
    T dy = T(0), dm = T(0);
    for (int64_t i = lane; i < s.IN; i += 32) {
      T hv = h[i];
      if (reconstruct) {
        hv = s.rule == PlasticRule::kHebb ? (hv - eta * y * p[i]) / (T(1) - eta)
           : s.rule == PlasticRule::kOja ? (hv - eta * y * p[i]) / (T(1) - eta * y * y)
                         : hv - m * y * p[i];
        h[i] = hv;
      }
      T g = gh[i];
      if (s.has_clip) {
        const T next = update(s, hv, p[i], y, eta, m, clip, false);
        if (next < -clip || next > clip) g = T(0);
        gh[i] = g;
      }
      dy += s.rule == PlasticRule::kHebb  ? g * eta * p[i]
          : s.rule == PlasticRule::kOja ? g * eta * (p[i] - T(2) * y * hv) : g * m * p[i];
      if (s.rule == PlasticRule::kModulated) dm += g * y * p[i];
    }
    dy = warp_all_sum(dy);
    dm = warp_all_sum(dm);
    if (lane == 0) {
      const T gy = grad_output[row] + dy + (s.recurrent ? carry[b * s.OUT + j] : T(0));
      const T gz = gy * (s.tanh ? T(1) - y * y : T(1));
      grad_z[row] = gz;
      gz_s[warp] = gz;
      y_s[warp] = y;
      m_s[warp] = m;
      if (s.rule == PlasticRule::kModulated) gmod_rows[b * s.OUT + j] = dm;
    }
  }
  __syncthreads();
  // Columns: dL/dH_t, alpha, eta and this block's share of the presynaptic gradient.
  const int rows = static_cast<int>(s.OUT - j0 < kPlasticRowsPerBlock ? s.OUT - j0 : kPlasticRowsPerBlock);
  T eta_sum = T(0), alpha_sum = T(0);
  for (int64_t i = threadIdx.x; i < s.IN; i += kThreads) {
    T gp = T(0);
    for (int r = 0; r < rows; ++r) {
      const int64_t jr = j0 + r;
      const int64_t e = (b * s.OUT + jr) * s.IN + i;
      const T hv = h_all[e], g = gh_all[e], y = y_s[r], gz = gz_s[r];
      const T a = s.alpha_scalar ? alpha[0] : alpha[jr * s.IN + i];
      const T hz = gz * p[i];
      if (s.alpha_scalar) alpha_sum += hz * hv; else galpha_part[e] += hz * hv;
      T d_h, d_p;
      if (s.rule == PlasticRule::kHebb) {
        d_h = T(1) - eta, d_p = eta * y;
        eta_sum += g * (y * p[i] - hv);
      } else if (s.rule == PlasticRule::kOja) {
        d_h = T(1) - eta * y * y, d_p = eta * y;
        eta_sum += g * y * (p[i] - y * hv);
      } else {
        d_h = T(1), d_p = m_s[r] * y;
      }
      gp += (weight[jr * s.IN + i] + a * hv) * gz + g * d_p;
      gh_all[e] = g * d_h + a * hz;
    }
    gpre_part[(blk * s.B + b) * s.IN + i] = gp;
  }
  red_eta[threadIdx.x] = eta_sum;
  red_alpha[threadIdx.x] = alpha_sum;
  __syncthreads();
  for (int stride = kThreads / 2; stride > 0; stride >>= 1) {
    if (threadIdx.x < stride) {
      red_eta[threadIdx.x] += red_eta[threadIdx.x + stride];
      red_alpha[threadIdx.x] += red_alpha[threadIdx.x + stride];
    }
    __syncthreads();
  }
  if (threadIdx.x == 0) {
    geta_part[b * blocks + blk] += red_eta[0];
    if (s.alpha_scalar) galpha_part[b * blocks + blk] += red_alpha[0];
  }
}

// Whole-sequence forward for small layers (OUT, IN <= kPlasticSequenceMaxN, no clip): one block
// per sequence keeps its trace in shared memory for all T steps, so the trace never leaves the
// chip between steps and there is one launch per sequence batch. Warp per row: z_j and the
// update of row j in the same pass, as in the step kernel; the block synchronizes once per step
// so every warp sees the new presynaptic vector.
template <typename T>
__global__ void __launch_bounds__(kThreads)
forward_sequence_kernel(PlasticStep s, int64_t steps, int64_t every, const T* __restrict__ x,
                        const T* __restrict__ weight, const T* __restrict__ alpha, const T* __restrict__ eta_ptr,
                        const T* __restrict__ bias, const T* __restrict__ drive, const T* __restrict__ y0,
                        const T* __restrict__ mod, T* __restrict__ hebb, T* __restrict__ output,
                        T* __restrict__ checkpoints) {
  extern __shared__ unsigned char smem_raw[];
  T* h = reinterpret_cast<T*>(smem_raw);   // [OUT, IN]
  T* p = h + s.OUT * s.IN;                 // [IN]: this step's presynaptic activity
  T* y_next = p + s.IN;                    // [OUT]: this step's post (the next step's pre, rnn)
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
  const int64_t b = blockIdx.x, size = s.OUT * s.IN;
  T* trace = hebb + b * size;
  const T eta = *eta_ptr;
  for (int64_t e = threadIdx.x; e < size; e += blockDim.x) h[e] = trace[e];
  for (int64_t i = threadIdx.x; i < s.IN; i += blockDim.x) {
    p[i] = s.recurrent ? (y0 ? y0[b * s.IN + i] : T(0)) : x[b * s.IN + i];
  }
  __syncthreads();
  for (int64_t t = 0; t < steps; ++t) {
    if (t % every == 0) {
      T* ckpt = checkpoints + ((t / every) * s.B + b) * size;
      for (int64_t e = threadIdx.x; e < size; e += blockDim.x) ckpt[e] = h[e];
      __syncthreads();  // the copy reads rows other warps are about to update
    }
    for (int64_t j = warp; j < s.OUT; j += warps) {
      T* row_h = h + j * s.IN;
      T z = T(0);
      for (int64_t i = lane; i < s.IN; i += 32) {
        const T a = s.alpha_scalar ? alpha[0] : alpha[j * s.IN + i];
        z += (weight[j * s.IN + i] + a * row_h[i]) * p[i];
      }
      z = warp_all_sum(z);
      const int64_t row = (t * s.B + b) * s.OUT + j;
      if (s.recurrent) {
        z += x[row];
      } else {
        if (s.has_bias) z += bias[j];
        if (s.has_drive) z += drive[row];
      }
      const T y = activation(z, s.tanh);
      if (lane == 0) {
        output[row] = y;
        y_next[j] = y;
      }
      PlasticStep at_t = s;
      at_t.t = t;
      const T m = s.rule == PlasticRule::kModulated ? modulation_of(at_t, mod, b, j) : T(0);
      for (int64_t i = lane; i < s.IN; i += 32) row_h[i] = update(s, row_h[i], p[i], y, eta, m, T(0), false);
    }
    __syncthreads();  // every row has read p and written y_next
    if (t + 1 < steps) {
      for (int64_t i = threadIdx.x; i < s.IN; i += blockDim.x) {
        p[i] = s.recurrent ? y_next[i] : x[((t + 1) * s.B + b) * s.IN + i];
      }
    }
    __syncthreads();
  }
  for (int64_t e = threadIdx.x; e < size; e += blockDim.x) trace[e] = h[e];
}

// Sequences on grid x (up to 2^31 - 1), a sequence's blocks of rows on y (65535 blocks: 524k rows).
dim3 step_grid(const PlasticStep& s) {
  return dim3(static_cast<unsigned>(s.B), static_cast<unsigned>(ceil_div(s.OUT, kPlasticRowsPerBlock)));
}

template <typename T>
size_t sequence_shared_bytes(const PlasticStep& s) {
  return sizeof(T) * static_cast<size_t>(s.OUT * s.IN + s.IN + s.OUT);
}

template <typename T>
cudaError_t forward_sequence(const PlasticStep& s, int64_t steps, int64_t every, const void* x, const void* w,
                             const void* a, const void* eta, const void* bias, const void* drive, const void* y0,
                             const void* mod, void* hebb, void* output, void* checkpoints, bool* launched,
                             cudaStream_t stream) {
  *launched = false;
  if (s.OUT > kPlasticSequenceMaxN || s.IN > kPlasticSequenceMaxN || s.has_clip || every < 1) return cudaSuccess;
  const size_t bytes = sequence_shared_bytes<T>(s);
  int device = 0, optin = 0;
  cudaError_t err = cudaGetDevice(&device);
  if (err == cudaSuccess) err = cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device);
  if (err != cudaSuccess) return err;
  if (bytes > static_cast<size_t>(optin)) return cudaSuccess;  // too big for this GPU: step kernels
  err = cudaFuncSetAttribute(forward_sequence_kernel<T>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                             static_cast<int>(bytes));
  if (err != cudaSuccess) return err;
  *launched = true;
  if (s.B == 0 || steps == 0) return cudaSuccess;
  forward_sequence_kernel<T><<<static_cast<unsigned>(s.B), kThreads, bytes, stream>>>(
      s, steps, every, static_cast<const T*>(x), static_cast<const T*>(w), static_cast<const T*>(a),
      static_cast<const T*>(eta), static_cast<const T*>(bias), static_cast<const T*>(drive),
      static_cast<const T*>(y0), static_cast<const T*>(mod), static_cast<T*>(hebb), static_cast<T*>(output),
      static_cast<T*>(checkpoints));
  return cudaGetLastError();
}

template <typename T>
cudaError_t forward_step(const PlasticStep& s, const void* x, const void* w, const void* a, const void* eta,
                         const void* clip, const void* bias, const void* drive, const void* pre, const void* mod,
                         void* trace, void* output, bool update_only, cudaStream_t stream) {
  const dim3 grid = step_grid(s);
  if (grid.x == 0 || grid.y == 0) return cudaSuccess;
  forward_step_kernel<T><<<grid, kThreads, 0, stream>>>(
      s, static_cast<const T*>(x), static_cast<const T*>(w), static_cast<const T*>(a), static_cast<const T*>(eta),
      static_cast<const T*>(clip), static_cast<const T*>(bias), static_cast<const T*>(drive),
      static_cast<const T*>(pre), static_cast<const T*>(mod), static_cast<T*>(trace), static_cast<T*>(output),
      update_only);
  return cudaGetLastError();
}

template <typename T>
cudaError_t backward_step(const PlasticStep& s, const void* w, const void* a, const void* eta, const void* clip,
                          const void* pre, const void* output, const void* grad_output, const void* carry,
                          const void* mod, void* h, void* gh, void* gz, void* gpre, void* galpha, void* geta,
                          void* gmod, bool reconstruct, cudaStream_t stream) {
  const dim3 grid = step_grid(s);
  if (grid.x == 0 || grid.y == 0) return cudaSuccess;
  backward_step_kernel<T><<<grid, kThreads, 0, stream>>>(
      s, static_cast<const T*>(w), static_cast<const T*>(a), static_cast<const T*>(eta), static_cast<const T*>(clip),
      static_cast<const T*>(pre), static_cast<const T*>(output), static_cast<const T*>(grad_output),
      static_cast<const T*>(carry), static_cast<const T*>(mod), static_cast<T*>(h), static_cast<T*>(gh),
      static_cast<T*>(gz), static_cast<T*>(gpre), static_cast<T*>(galpha), static_cast<T*>(geta),
      static_cast<T*>(gmod), reconstruct);
  return cudaGetLastError();
}

}  // namespace

cudaError_t plastic_forward_sequence(bool is_double, const PlasticStep& s, int64_t steps, int64_t every, const void* x,
                                     const void* weight, const void* alpha, const void* eta, const void* bias,
                                     const void* drive, const void* y0, const void* modulation, void* hebb,
                                     void* output, void* checkpoints, bool* launched, cudaStream_t stream) {
  return is_double ? forward_sequence<double>(s, steps, every, x, weight, alpha, eta, bias, drive, y0, modulation, hebb,
                                              output, checkpoints, launched, stream)
                   : forward_sequence<float>(s, steps, every, x, weight, alpha, eta, bias, drive, y0, modulation, hebb,
                                             output, checkpoints, launched, stream);
}

cudaError_t plastic_forward_step(bool is_double, const PlasticStep& s, const void* x, const void* weight,
                                 const void* alpha, const void* eta, const void* clip, const void* bias,
                                 const void* drive, const void* pre, const void* modulation, void* trace,
                                 void* output, bool update_only, cudaStream_t stream) {
  return is_double ? forward_step<double>(s, x, weight, alpha, eta, clip, bias, drive, pre, modulation, trace, output,
                                          update_only, stream)
                   : forward_step<float>(s, x, weight, alpha, eta, clip, bias, drive, pre, modulation, trace, output,
                                         update_only, stream);
}

cudaError_t plastic_backward_step(bool is_double, const PlasticStep& s, const void* weight, const void* alpha,
                                  const void* eta, const void* clip, const void* pre, const void* output,
                                  const void* grad_output, const void* carry, const void* modulation, void* h,
                                  void* grad_trace, void* grad_z, void* gpre_part, void* galpha_part, void* geta_part,
                                  void* gmod_rows, bool reconstruct, cudaStream_t stream) {
  return is_double ? backward_step<double>(s, weight, alpha, eta, clip, pre, output, grad_output, carry, modulation, h,
                                           grad_trace, grad_z, gpre_part, galpha_part, geta_part, gmod_rows,
                                           reconstruct, stream)
                   : backward_step<float>(s, weight, alpha, eta, clip, pre, output, grad_output, carry, modulation, h,
                                          grad_trace, grad_z, gpre_part, galpha_part, geta_part, gmod_rows,
                                          reconstruct, stream);
}

}  // namespace neuronml_fast::cuda
