"""SigLIP's sigmoid loss: equal to open_clip's SigLipLoss in one process and under 2 gloo processes, multi-positive
labels from ids, and data parallel giving the gradients of one process on the whole batch."""

import math

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from clipsnail.train.losses import distributed_siglip_loss, positives_from_ids, siglip_loss

WORLD, PER_RANK, DIM = 2, 4, 8
# Image 0 twice (once in each process's half), and one caption id shared across the two halves: multi-positive.
IMAGE_IDS = torch.tensor([0, 1, 2, 3, 0, 5, 6, 7])
CAPTION_IDS = torch.tensor([10, 11, 12, 13, 14, 15, 11, 17])
IMPLS = ("bidir", "shift", "reduce", "gather")  # open_clip's ways of passing the text features between ranks


def features(n=8, d=DIM, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return (F.normalize(torch.randn(n, d, generator=g, dtype=dtype), dim=-1),
            F.normalize(torch.randn(n, d, generator=g, dtype=dtype), dim=-1))


def leaves(*tensors):
    return [t.detach().clone().requires_grad_(True) for t in tensors]


def value_and_grads(loss_fn, image, text, t, bias, **kw):
    """The loss on copies of the inputs, with its gradients w.r.t. the features, the log temperature t (the model's
    parameter: the losses take exp(t)) and the bias."""
    image, text, t, bias = leaves(image, text, t, bias)
    loss = loss_fn(image, text, t.exp(), bias, **kw)
    return (loss.detach(), *torch.autograd.grad(loss, (image, text, t, bias)))


def scale_and_bias(dtype=torch.float64):
    """The paper's initialisation: t' = log 10, b = -10."""
    return torch.tensor(math.log(10.0), dtype=dtype), torch.tensor(-10.0, dtype=dtype)


# ----------------------------------------------------------------------------------------------- one process


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_equals_open_clip_siglip_loss(dtype):
    open_clip_loss = pytest.importorskip("open_clip.loss")
    image, text = features(dtype=dtype)
    for t, bias in [scale_and_bias(dtype), (torch.tensor(2.3, dtype=dtype), torch.tensor(0.7, dtype=dtype))]:
        ours = value_and_grads(siglip_loss, image, text, t, bias)
        theirs = value_and_grads(open_clip_loss.SigLipLoss(), image, text, t, bias)
        for name, a, b in zip(("loss", "image", "text", "t", "bias"), ours, theirs):
            torch.testing.assert_close(a, b, msg=name)


def test_hand_computation():
    image, text = features(n=3, d=4)
    scale, bias = torch.tensor(7.0, dtype=torch.float64), torch.tensor(-2.0, dtype=torch.float64)
    total = 0.0
    for i in range(3):
        for j in range(3):
            z = 7.0 * float(image[i] @ text[j]) - 2.0
            total += math.log1p(math.exp(-z if i == j else z))  # -log sigmoid(label * z)
    assert siglip_loss(image, text, scale, bias).item() == pytest.approx(total / 3, rel=1e-12)


def test_distinct_ids_give_the_diagonal_loss():
    image, text = features()
    scale, bias = torch.tensor(10.0, dtype=torch.float64), torch.tensor(-10.0, dtype=torch.float64)
    plain = siglip_loss(image, text, scale, bias)
    torch.testing.assert_close(siglip_loss(image, text, scale, bias, positives_from_ids(torch.arange(8))), plain)
    torch.testing.assert_close(
        siglip_loss(image, text, scale, bias, positives_from_ids(torch.arange(8), torch.arange(8) + 100)), plain)


def test_duplicate_ids_label_their_pairs_positive():
    # Image 0 twice with two captions: pairs (0, 1) and (1, 0) become +1 labels as well as the diagonal.
    image, text = features(n=4, d=6, seed=2)
    ids = torch.tensor([0, 0, 1, 2])
    scale, bias = 5.0, -1.5
    z = [[scale * float(image[i] @ text[j]) + bias for j in range(4)] for i in range(4)]
    expected = sum(math.log1p(math.exp(-z[i][j] if ids[i] == ids[j] else z[i][j]))
                   for i in range(4) for j in range(4)) / 4
    s, b = torch.tensor(scale, dtype=torch.float64), torch.tensor(bias, dtype=torch.float64)
    multi = siglip_loss(image, text, s, b, positives_from_ids(ids))
    assert multi.item() == pytest.approx(expected, rel=1e-12)
    # Exactly those two pairs flipped from -1 to +1: -log sigmoid(z) + log sigmoid(-z) = -z for each.
    plain = siglip_loss(image, text, s, b)
    assert (multi - plain).item() == pytest.approx(-(z[0][1] + z[1][0]) / 4, rel=1e-10)


def test_rows_at_an_offset_are_their_share_of_the_square_loss():
    """A process's own images against every text: its diagonal sits at its offset in the global batch."""
    image, text = features()
    scale, bias = torch.tensor(10.0, dtype=torch.float64), torch.tensor(-5.0, dtype=torch.float64)
    shares = [siglip_loss(image[r:r + 2], text, scale, bias, offset=r) * 2 for r in range(0, 8, 2)]
    torch.testing.assert_close(sum(shares), siglip_loss(image, text, scale, bias) * 8)
    ids = torch.arange(8)
    torch.testing.assert_close(siglip_loss(image[2:4], text, scale, bias, offset=2),
                               siglip_loss(image[2:4], text, scale, bias, positives_from_ids(ids, rows=slice(2, 4))))


def test_alone_in_one_process_the_distributed_loss_is_the_plain_one():
    image, text = features()
    t, bias = scale_and_bias()
    torch.testing.assert_close(distributed_siglip_loss(image, text, t.exp(), bias),
                               siglip_loss(image, text, t.exp(), bias))
    torch.testing.assert_close(distributed_siglip_loss(image, text, t.exp(), bias, ids=(IMAGE_IDS, CAPTION_IDS)),
                               siglip_loss(image, text, t.exp(), bias, positives_from_ids(IMAGE_IDS, CAPTION_IDS)))


# ----------------------------------------------------------------------------------------------- two processes


def projections():
    """Stand-ins for the two towers' parameters, the same on every rank (as DDP keeps them): features are
    normalize(inputs @ W), so the parameter gradients gather every sample's contribution as DDP's do."""
    g = torch.Generator().manual_seed(5)
    return {"w_image": torch.randn(6, DIM, generator=g, dtype=torch.float64),
            "w_text": torch.randn(5, DIM, generator=g, dtype=torch.float64),
            "t": scale_and_bias()[0], "bias": scale_and_bias()[1]}


def inputs():
    g = torch.Generator().manual_seed(6)
    return (torch.randn(WORLD * PER_RANK, 6, generator=g, dtype=torch.float64),
            torch.randn(WORLD * PER_RANK, 5, generator=g, dtype=torch.float64))


def tower_loss(params, x_image, x_text, ids):
    image = F.normalize(x_image @ params["w_image"], dim=-1)
    text = F.normalize(x_text @ params["w_text"], dim=-1)
    return image, text, distributed_siglip_loss(image, text, params["t"].exp(), params["bias"], ids=ids)


def _rank_worker(rank, world, store, out):
    try:
        from open_clip.loss import SigLipLoss
    except ImportError:  # the data-parallel checks below still run; the open_clip test skips
        SigLipLoss = None

    torch.distributed.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        torch.set_num_threads(1)
        own = slice(rank * PER_RANK, (rank + 1) * PER_RANK)
        results = {}

        # This rank's loss and its gradients, ours and open_clip's, in the same process group.
        image, text = (f[own] for f in features(n=world * PER_RANK))
        t, bias = scale_and_bias()
        keys = ("loss", "image", "text", "t", "bias")
        for name, value in zip(keys, value_and_grads(distributed_siglip_loss, image, text, t, bias)):
            results[f"ours.{name}"] = value
        for impl in IMPLS + ("default",) if SigLipLoss else ():
            loss_fn = SigLipLoss(rank=rank, world_size=world, **({} if impl == "default" else {"dist_impl": impl}))
            for name, value in zip(keys, value_and_grads(loss_fn, image, text, t, bias)):
                results[f"{impl}.{name}"] = value

        # Data parallel: each rank its share of the inputs, parameter gradients averaged over ranks as DDP does.
        x_image, x_text = inputs()
        for case, ids in (("diagonal", ()), ("ids", (IMAGE_IDS[own], CAPTION_IDS[own]))):
            params = {k: v.clone().requires_grad_(True) for k, v in projections().items()}
            image, text, loss = tower_loss(params, x_image[own], x_text[own], ids)
            image.retain_grad()
            text.retain_grad()
            loss.backward()
            mean_loss = loss.detach().clone()
            torch.distributed.all_reduce(mean_loss)
            results[f"ddp.{case}.loss"] = mean_loss / world
            for k, p in params.items():
                torch.distributed.all_reduce(p.grad)
                results[f"ddp.{case}.{k}"] = p.grad / world
            results[f"ddp.{case}.image"], results[f"ddp.{case}.text"] = image.grad, text.grad

        save_file({k: v.detach().reshape(-1).contiguous() for k, v in results.items()}, f"{out}/rank{rank}.st")
    finally:
        torch.distributed.destroy_process_group()


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    """Results of `_rank_worker` on each of 2 gloo processes (spawned once for the tests below)."""
    out = tmp_path_factory.mktemp("siglip_ranks")
    mp.start_processes(_rank_worker, args=(WORLD, out / "store", str(out)), nprocs=WORLD, start_method="spawn")
    return [load_file(str(out / f"rank{r}.st")) for r in range(WORLD)]


@pytest.mark.slow  # the two processes take 5-9 s to start (importing torch and open_clip), shared by the tests below
@pytest.mark.parametrize("impl", IMPLS + ("default",))
def test_two_processes_equal_open_clip_on_each_rank(impl, two_ranks):
    pytest.importorskip("open_clip.loss")
    for rank, got in enumerate(two_ranks):
        for name in ("loss", "image", "text", "t", "bias"):
            torch.testing.assert_close(got[f"ours.{name}"], got[f"{impl}.{name}"], msg=f"rank {rank} {name}")


@pytest.mark.slow
@pytest.mark.parametrize("case", ["diagonal", "ids"])
def test_two_processes_give_the_gradients_of_one_process_on_the_whole_batch(two_ranks, case):
    params = {k: v.clone().requires_grad_(True) for k, v in projections().items()}
    ids = () if case == "diagonal" else (IMAGE_IDS, CAPTION_IDS)
    image, text, loss = tower_loss(params, *inputs(), ids)
    image.retain_grad()
    text.retain_grad()
    loss.backward()
    for got in two_ranks:  # DDP's averages are the same on every rank
        torch.testing.assert_close(got[f"ddp.{case}.loss"][0], loss.detach(), msg="loss")
        for k, p in params.items():
            torch.testing.assert_close(got[f"ddp.{case}.{k}"], p.grad.reshape(-1), msg=k)
    # Each rank's own features get world x the whole-batch gradient (its loss is divided by b, not B = world * b);
    # DDP's division by the world size undoes it in the parameters.
    for name, grad in (("image", image.grad), ("text", text.grad)):
        per_rank = torch.cat([got[f"ddp.{case}.{name}"].reshape(PER_RANK, DIM) for got in two_ranks])
        torch.testing.assert_close(per_rank / WORLD, grad, msg=name)
    if case == "ids":  # the cross-rank duplicates really are positives: the loss is not the diagonal one
        assert not torch.isclose(two_ranks[0]["ddp.ids.loss"], two_ranks[0]["ddp.diagonal.loss"])
