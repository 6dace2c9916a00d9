# Copyright 2020 The Google Research Authors.
#
# Licensed under the Apache License, Version 2.0 (the "License");
# you may not use this file except in compliance with the License.
# You may obtain a copy of the License at
#
#     http://www.apache.org/licenses/LICENSE-2.0
#
# Unless required by applicable law or agreed to in writing, software
# distributed under the License is distributed on an "AS IS" BASIS,
# WITHOUT WARRANTIES OR CONDITIONS OF ANY KIND, either express or implied.
# See the License for the specific language governing permissions and
# limitations under the License.

"""Test fixture: the ResNet-20 haiku models of the NeurIPS 2021 Approximate Inference in
BDL competition's reference ``jax_models.py`` (github.com/izmailovpavel/
neurips_bdl_starter_kit, from google-research bnn_hmc), copied verbatim from
``he_normal`` to ``make_resnet20_frn_fn`` (reformatted by ruff), plus its
``resnet20_frn_swish`` entry of ``get_model``. One fix, marked below.
"""

import functools

import haiku as hk
import jax
import jax.numpy as jnp

_DEFAULT_BN_CONFIG = {"decay_rate": 0.9, "eps": 1e-5, "create_scale": True, "create_offset": True}


he_normal = hk.initializers.VarianceScaling(2.0, "fan_in", "truncated_normal")


class FilterResponseNorm(hk.Module):
    def __init__(self, eps=1e-6, name="frn"):
        super().__init__(name=name)
        self.eps = eps

    def __call__(self, x, **unused_kwargs):
        del unused_kwargs
        par_shape = (1, 1, 1, x.shape[-1])  # [1,1,1,C]
        tau = hk.get_parameter("tau", par_shape, x.dtype, init=jnp.zeros)
        beta = hk.get_parameter("beta", par_shape, x.dtype, init=jnp.zeros)
        gamma = hk.get_parameter("gamma", par_shape, x.dtype, init=jnp.ones)
        nu2 = jnp.mean(jnp.square(x), axis=[1, 2], keepdims=True)
        x = x * jax.lax.rsqrt(nu2 + self.eps)
        y = gamma * x + beta
        z = jnp.maximum(y, tau)
        return z


def _resnet_layer(
    inputs,
    num_filters,
    normalization_layer,
    kernel_size=3,
    strides=1,
    activation=lambda x: x,
    use_bias=True,
    is_training=True,
):
    x = inputs
    x = hk.Conv2D(
        num_filters,
        kernel_size,
        stride=strides,
        padding="same",
        w_init=he_normal,
        with_bias=use_bias,
    )(x)
    x = normalization_layer()(x, is_training=is_training)
    x = activation(x)
    return x


def make_resnet_fn(
    num_classes: int,
    depth: int,
    normalization_layer,
    width: int = 16,
    use_bias: bool = True,
    activation=jax.nn.relu,
):
    num_res_blocks = (depth - 2) // 6
    if (depth - 2) % 6 != 0:
        raise ValueError("depth must be 6n+2 (e.g. 20, 32, 44).")

    def forward(x, is_training):
        num_filters = width
        x = _resnet_layer(
            x,
            num_filters=num_filters,
            activation=activation,
            use_bias=use_bias,
            normalization_layer=normalization_layer,
        )
        for stack in range(3):
            for res_block in range(num_res_blocks):
                strides = 1
                if stack > 0 and res_block == 0:  # first layer but not first stack
                    strides = 2  # downsample
                y = _resnet_layer(
                    x,
                    num_filters=num_filters,
                    strides=strides,
                    activation=activation,
                    use_bias=use_bias,
                    is_training=is_training,
                    normalization_layer=normalization_layer,
                )
                y = _resnet_layer(
                    y,
                    num_filters=num_filters,
                    use_bias=use_bias,
                    is_training=is_training,
                    normalization_layer=normalization_layer,
                )
                if stack > 0 and res_block == 0:  # first layer but not first stack
                    # linear projection residual shortcut connection to match changed dims
                    x = _resnet_layer(
                        x,
                        num_filters=num_filters,
                        kernel_size=1,
                        strides=strides,
                        use_bias=use_bias,
                        is_training=is_training,
                        normalization_layer=normalization_layer,
                    )
                x = activation(x + y)
            num_filters *= 2
        x = hk.AvgPool((8, 8, 1), 8, "VALID")(x)
        x = hk.Flatten()(x)
        logits = hk.Linear(num_classes, w_init=he_normal)(x)
        return logits

    return forward


def make_resnet20_fn(data_info, activation=jax.nn.relu):
    num_classes = data_info["num_classes"]

    # The competition's file has `def normalization_layer(): hk.BatchNorm(...)`, which
    # returns None; bnn_hmc's make_resnet20_fn returns the module, as here.
    def normalization_layer():
        return hk.BatchNorm(**_DEFAULT_BN_CONFIG)

    return make_resnet_fn(
        num_classes, depth=20, normalization_layer=normalization_layer, activation=activation
    )


def make_resnet20_frn_fn(data_info, activation=jax.nn.relu):
    num_classes = data_info["num_classes"]
    return make_resnet_fn(
        num_classes, depth=20, normalization_layer=FilterResponseNorm, activation=activation
    )


# get_model's "resnet20_frn_swish": the competition's CIFAR-10 model.
make_resnet20_frn_swish_fn = functools.partial(make_resnet20_frn_fn, activation=jax.nn.swish)
