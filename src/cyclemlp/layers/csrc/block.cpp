// One CycleMLP block in CPU float32 inference on one image, as a single operator.
//
// The block's work at batch 1 is a few large products and some forty small operators (the pooled
// mean, the reweighting MLP, the softmax, the folded weights). Called from Python, each of them
// pays the interpreter and the binding on top of its work, all on one thread while the other
// threads wait. This operator makes the same ATen and oneDNN calls, in the same order, as the
// Python inference path of cyclemlp.layers.kernels (cycle_block with _mixer_inference and
// _channel_mlp for one image, whole MLP), so it computes exactly the same numbers; only the
// calling is native. The Python side prepares the weights (kernels._native_block) and decides
// when this applies.
//
// Weights, in order (all float32, detached):
//   0-3   norm1.weight, norm1.bias, norm2.weight, norm2.bias
//   4-5   offsets of the width and the height Cycle FC, (C, 2) integers
//   6-9   reweight.fc1.weight, .bias, reweight.fc2.weight, .bias
//   10-13 mlp.fc1 weight (oneDNN layout), .bias, mlp.fc2 weight (oneDNN layout), .bias
// then, with `fold` (C <= 128: the projection folded into per-image branch weights):
//   14-19 branch weights side by side (C, 3C), their bias sum (C), stacked (3, C, C),
//         biases (C, 3), proj.weight, proj.bias
// else (branch outputs first):
//   14-16 the three branch weights (oneDNN layout), 17-19 their biases, 20 proj.weight (oneDNN
//         layout), 21 proj.bias

#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include <optional>
#include <string_view>
#include <vector>

namespace {

at::Tensor linear_pointwise(const at::Tensor& x, const at::Tensor& w, const std::optional<at::Tensor>& b,
                            std::string_view attr, std::optional<std::string_view> algorithm) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("mkldnn::_linear_pointwise", "")
                       .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&,
                                         std::string_view, c10::List<std::optional<at::Scalar>>,
                                         std::optional<std::string_view>)>();
  return op.call(x, w, b, attr, c10::List<std::optional<at::Scalar>>(), algorithm);
}

// x @ w^T + b + other, the add inside the product
at::Tensor linear_add(const at::Tensor& x, const at::Tensor& other, const at::Tensor& w,
                      const std::optional<at::Tensor>& b) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("mkldnn::_linear_pointwise", "binary")
                       .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                         const std::optional<at::Tensor>&, std::string_view)>();
  return op.call(x, other, w, b, "add");
}

// softmax over the branches of reweight(pooled): (B, C, n), as kernels._coefficients
at::Tensor coefficients(const at::Tensor& pooled, const at::Tensor& w1, const at::Tensor& b1, const at::Tensor& w2,
                        const at::Tensor& b2, int64_t n) {
  const at::Tensor logits = at::linear(at::gelu(at::linear(pooled, w1, b1)), w2, b2);
  return logits.reshape({pooled.size(0), -1, n}).transpose(1, 2).softmax(1).transpose(1, 2);
}

at::Tensor block_inference(const at::Tensor& x, at::TensorList w, double eps1, double eps2, bool fold) {
  TORCH_CHECK(x.dim() == 4 && x.size(0) == 1 && x.scalar_type() == at::kFloat && x.device().is_cpu(),
              "cyclemlp::block_inference takes one float32 CPU image (1, H, W, C); got ", x.sizes());
  TORCH_CHECK(w.size() == (fold ? 20u : 22u), "cyclemlp::block_inference: wrong number of weights, ", w.size());
  const int64_t height = x.size(1), width = x.size(2), dim = x.size(3), rows = height * width;
  static auto shift = c10::Dispatcher::singleton()
                          .findSchemaOrThrow("cyclemlp::shift", "")
                          .typed<at::Tensor(const at::Tensor&, const at::Tensor&)>();

  // x = x + mixer(norm1(x))
  const at::Tensor y = at::layer_norm(x, {dim}, w[0], w[1], eps1);
  const std::vector<at::Tensor> parts = {shift.call(y, w[4]).view({1, rows, dim}),
                                         shift.call(y, w[5]).view({1, rows, dim}), y.view({1, rows, dim})};
  const at::Tensor res = x.reshape({rows, dim});
  at::Tensor mixed;
  if (fold) {
    const at::Tensor &weight = w[14], &bias_sum = w[15], &stacked = w[16], &bias = w[17], &proj_w = w[18],
                     &proj_b = w[19];
    const at::Tensor pooled =
        at::linear(at::cat({parts[0].mean(1), parts[1].mean(1), parts[2].mean(1)}, 1), weight, bias_sum);
    const at::Tensor a = coefficients(pooled, w[6], w[7], w[8], w[9], 3)[0];  // (C, n)
    const at::Tensor folded = at::matmul(proj_w, stacked * a.t().unsqueeze(-1));  // P diag(a_k) W_k
    const at::Tensor folded_bias = at::addmv(proj_b, proj_w, (a * bias).sum(-1));
    at::Tensor out = res;
    for (int k = 0; k < 3; ++k) {
      out = linear_add(parts[k].view({rows, dim}), out, folded[k],
                       k == 0 ? std::optional<at::Tensor>(folded_bias) : std::nullopt);
    }
    mixed = out.view({1, height, width, dim});
  } else {
    std::vector<at::Tensor> ys;
    for (int k = 0; k < 3; ++k) {
      ys.push_back(linear_pointwise(parts[k].view({rows, dim}), w[14 + k], w[17 + k], "none", std::string_view()));
    }
    at::Tensor total = ys[0];
    for (int k = 1; k < 3; ++k) total = total + ys[k];
    const at::Tensor a = coefficients(total.mean(0, /*keepdim=*/true), w[6], w[7], w[8], w[9], 3)[0];  // (C, n)
    at::Tensor out = ys[0].mul_(a.select(1, 0));
    for (int k = 1; k < 3; ++k) out.addcmul_(ys[k], a.select(1, k));
    mixed = linear_add(out.view({1, height, width, dim}), x, w[20], w[21]);
  }

  // x + mlp(norm2(x)): the exact GELU after the first product (as fast as oneDNN's fused one with
  // AVX-512, faster with AVX2), the residual add inside the second
  const at::Tensor z = at::layer_norm(mixed, {dim}, w[2], w[3], eps2).reshape({rows, dim});
  at::Tensor hidden = linear_pointwise(z, w[10], w[11], "none", std::string_view());
  at::gelu_(hidden);
  return linear_add(hidden, mixed.reshape({rows, dim}), w[12], w[13]).view(x.sizes());
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(cyclemlp, m) {
  m.def("block_inference(Tensor x, Tensor[] weights, float eps1, float eps2, bool fold) -> Tensor");
}

// oneDNN-layout weights are MkldnnCPU tensors: the call dispatches on that key when they are passed
TORCH_LIBRARY_IMPL(cyclemlp, CPU, m) {
  m.impl("block_inference", &block_inference);
}

TORCH_LIBRARY_IMPL(cyclemlp, MkldnnCPU, m) {
  m.impl("block_inference", &block_inference);
}
