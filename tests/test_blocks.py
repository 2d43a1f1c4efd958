"""The equivalences the papers state, proven with tied weights: ResNeXt forms (a) == (b) == (c),
and the Xception paper's Figure 2 (towers) == Figure 3 (one 1x1 conv + segmented 3x3)."""
import jax
import numpy as np
import pytest
from flax import nnx

from jaxconv.nn import blocks
from tests.helpers import randomise, rngs

TOL = dict(atol=1e-5, rtol=1e-5)


def _copy_bn(dst, src, sl):
    for name in ("scale", "bias", "mean", "var"):
        getattr(dst, name)[...] = getattr(src, name)[...][sl]


def _tie_resnext(paths_block, grouped, width):
    """Slice the grouped block's weights into the per-path convs of form (a) or (b)."""
    for i, path in enumerate(paths_block.paths):
        sl = slice(i * width, (i + 1) * width)
        path.conv1.kernel[...] = grouped.conv1.kernel[...][..., sl]
        _copy_bn(path.bn1, grouped.bn1, sl)
        path.conv2.kernel[...] = grouped.conv2.kernel[...][..., sl]
        _copy_bn(path.bn2, grouped.bn2, sl)
        if path.conv3 is not None:
            path.conv3.kernel[...] = grouped.conv3.kernel[...][:, :, sl, :]
    if getattr(paths_block, "conv3", None) is not None:
        paths_block.conv3.kernel[...] = grouped.conv3.kernel[...]
    _copy_bn(paths_block.bn3, grouped.bn3, slice(None))
    if grouped.downsample is not None:
        nnx.update(paths_block.downsample, nnx.state(grouped.downsample))


@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("form", [blocks.ResNeXtBlockA, blocks.ResNeXtBlockB])
@pytest.mark.parametrize("cin, cout, stride", [(16, 16, 1), (8, 32, 2)])
def test_resnext_forms_equal_grouped(form, cin, cout, stride, train):
    cardinality, width = 8, 2
    grouped = blocks.ResNeXtBlockC(cin, cout, cardinality, width, stride, rngs=rngs())
    paths = form(cin, cout, cardinality, width, stride, rngs=nnx.Rngs(1))
    randomise(grouped)
    _tie_resnext(paths, grouped, width)
    for m in (grouped, paths):
        m.train() if train else m.eval()
    x = jax.random.normal(jax.random.key(2), (3, 9, 7, cin))
    expected = grouped(x)
    np.testing.assert_allclose(paths(x), expected, **TOL)
    # and the paths are really independent: untying one path changes the output
    paths.paths[0].conv2.kernel[...] = paths.paths[0].conv2.kernel[...] + 1.0
    assert not np.allclose(paths(x), expected, **TOL)


@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
def test_simplified_inception_equals_segmented(train):
    towers, red, out = 3, 4, 5
    fig3 = blocks.SegmentedInception(6, towers * red, towers * out, segments=towers, rngs=rngs())
    fig2 = blocks.SimplifiedInception(6, red, out, towers=towers, rngs=nnx.Rngs(1))
    randomise(fig3)
    for t, tower in enumerate(fig2.towers):
        r, o = slice(t * red, (t + 1) * red), slice(t * out, (t + 1) * out)
        tower[0].conv.kernel[...] = fig3.reduce.conv.kernel[...][..., r]
        _copy_bn(tower[0].bn, fig3.reduce.bn, r)
        tower[1].conv.kernel[...] = fig3.spatial.conv.kernel[...][..., o]
        _copy_bn(tower[1].bn, fig3.spatial.bn, o)
    for m in (fig2, fig3):
        m.train() if train else m.eval()
    x = jax.random.normal(jax.random.key(3), (2, 8, 7, 6))
    np.testing.assert_allclose(fig2(x), fig3(x), **TOL)


def test_extreme_inception_is_depthwise():
    m = blocks.ExtremeInception(6, 10, rngs=rngs())
    assert m.spatial.conv.groups == 10 and m.spatial.conv.kernel.shape == (3, 3, 1, 10)


def test_inception_branches_have_their_own_weights():
    m = blocks.InceptionModule(8, 4, 4, 4, 4, 4, 4, rngs=rngs())
    kernels = [np.asarray(v[...]) for p, v in nnx.to_flat_state(nnx.state(m, nnx.Param))
               if p[-1] == "kernel" and v.shape == (1, 1, 8, 4)]
    assert len(kernels) == 4  # one 1x1 conv per branch, not one shared
    assert all(not np.array_equal(a, b) for i, a in enumerate(kernels) for b in kernels[i + 1:])
