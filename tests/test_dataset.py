"""Tests for dataset.py: odd files, transforms, the reproducible training stream, histogram matching,
blur images and the test loader. Images are tiny and live in tmp_path."""

from __future__ import annotations

import os
import signal
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import dataset as ds
import errors
import images

# Distinct solid colours: a solid image stays solid under flips and crops, so its colour tells which
# source image a training sample came from.
COLOURS = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0), (0, 255, 255), (255, 0, 255),
           (0, 0, 0), (255, 255, 255), (127, 127, 127)]


def solid(path: Path, colour: tuple[int, int, int], size: int = 12) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new('RGB', (size, size), colour).save(path)
    return path


def colour_of(batch_images: torch.Tensor) -> list[tuple[int, ...]]:
    """The solid colour (0..255) of each image of a N×3×s×s batch in [-1, 1]."""
    values = ((batch_images.mean(dim=(2, 3)) + 1) * 127.5).round().to(torch.int64)
    return [tuple(v.tolist()) for v in values]


def make_domains(root: Path, n_a: int = 5, n_b: int = 7) -> None:
    for i in range(n_a):
        solid(root / 'trainA' / f'a{i}.png', COLOURS[i])
    for i in range(n_b):
        solid(root / 'trainB' / f'b{i}.png', COLOURS[i])


def take(stream, steps: int) -> list[dict[str, torch.Tensor]]:
    return [next(stream) for _ in range(steps)]


def assert_same_batches(first, second) -> None:
    assert len(first) == len(second)
    for one, two in zip(first, second, strict=True):
        assert one.keys() == two.keys()
        for key in one:
            assert torch.equal(one[key], two[key]), key


# ---------------------------------------------------------------------------------------------------
# Odd files


@pytest.fixture
def odd_folder(tmp_path: Path) -> Path:
    folder = tmp_path / 'trainA'
    folder.mkdir()
    (folder / 'corrupt.png').write_bytes(b'\x89PNG\r\n\x1a\n' + b'garbage' * 20)
    (folder / 'notes.txt').write_text('not an image')
    (folder / 'fake.jpg').write_text('plain text pretending to be a JPEG')
    Image.new('L', (20, 10), 77).save(folder / 'gray.png')
    palette = Image.new('P', (9, 9), 1)
    palette.putpalette([0, 0, 0, 10, 200, 30] + [0] * 762)
    palette.save(folder / 'palette.png')
    rgba = np.zeros((8, 8, 4), np.uint8)
    rgba[:, :4] = (10, 20, 30, 255)  # left half opaque, right half fully transparent black
    Image.fromarray(rgba).save(folder / 'rgba.png')
    sixteen = np.array([[0, 257 * 128, 65535, 1000]], np.uint16)
    Image.fromarray(sixteen).save(folder / 'deep16.png')
    Image.new('CMYK', (12, 12), (255, 0, 0, 0)).save(folder / 'cmyk.jpg')
    Image.new('RGB', (1, 1), (5, 6, 7)).save(folder / 'tiny.png')
    solid(folder / 'sub' / 'deeper' / 'nested.PNG', (1, 2, 3))
    solid(folder / 'UPPER.JPG', (200, 100, 50))
    Image.new('LA', (6, 6), (90, 0)).save(folder / 'la.png')
    return folder


def test_find_images_recursive_case_insensitive_sorted(odd_folder: Path) -> None:
    names = [p.relative_to(odd_folder).as_posix() for p in images.find_images(odd_folder)]
    assert names == sorted(names, key=str)
    assert 'notes.txt' not in names
    assert {'UPPER.JPG', 'sub/deeper/nested.PNG', 'fake.jpg', 'corrupt.png'} <= set(names)
    assert len(names) == 11


def test_domain_images_skips_unreadable_with_one_line_per_file_once(odd_folder: Path, capsys) -> None:
    images._WARNED.clear()
    paths, labels = ds.domain_images(odd_folder.parent, 'trainA')
    ds.domain_images(odd_folder.parent, 'trainA')      # listed again (validation, then training)
    lines = capsys.readouterr().err.strip().splitlines()
    assert sorted(lines) == [f'warning: skipping unreadable image {odd_folder / name}'
                             for name in ('corrupt.png', 'fake.jpg')]
    assert labels is None
    assert {p.name for p in paths} == {'gray.png', 'palette.png', 'rgba.png', 'deep16.png', 'cmyk.jpg',
                                       'tiny.png', 'nested.PNG', 'UPPER.JPG', 'la.png'}


def test_every_readable_odd_file_becomes_a_normalised_rgb_tensor(odd_folder: Path) -> None:
    paths, _ = ds.domain_images(odd_folder.parent, 'trainA')
    train, test = ds.train_transform(16, aug_prob=1.0), ds.test_transform(16)
    for path in paths:
        img = images.load_rgb(path)
        assert img.mode == 'RGB'
        for tensor in (train(img, torch.Generator().manual_seed(0)), test(img)):
            assert tensor.shape == (3, 16, 16) and tensor.dtype == torch.float32
            assert tensor.min() >= -1.0 and tensor.max() <= 1.0


def test_load_rgb_pixel_values(odd_folder: Path) -> None:
    def pixels(name: str) -> np.ndarray:
        return np.asarray(images.load_rgb(odd_folder / name))

    assert (pixels('gray.png') == 77).all()
    assert (pixels('palette.png') == (10, 200, 30)).all()
    rgba = pixels('rgba.png')
    assert (rgba[:, :4] == (10, 20, 30)).all() and (rgba[:, 4:] == 255).all()  # composited on white
    # 16-bit scaled by 255/65535 (Pillow's own convert would clip 1000 and 32896 to 255).
    assert pixels('deep16.png')[0, :, 0].tolist() == [0, 128, 255, 4]
    cyan = pixels('cmyk.jpg')[6, 6]
    assert cyan[0] < 30 and cyan[1] > 220 and cyan[2] > 220
    assert pixels('tiny.png').tolist() == [[[5, 6, 7]]]
    assert (pixels('la.png') == 255).all()  # fully transparent grey -> white


def test_float_and_int32_images_are_scaled(tmp_path: Path) -> None:
    Image.fromarray(np.array([[0.0, 0.5, 1.0]], np.float32)).save(tmp_path / 'f.tif')
    Image.fromarray(np.array([[0, 65535, 257 * 10]], np.int32)).save(tmp_path / 'i.tif')
    assert np.asarray(images.load_rgb(tmp_path / 'f.tif'))[0, :, 1].tolist() == [0, 128, 255]
    assert np.asarray(images.load_rgb(tmp_path / 'i.tif'))[0, :, 2].tolist() == [0, 255, 10]


def test_unreadable_image_raises(odd_folder: Path) -> None:
    for name in ('corrupt.png', 'fake.jpg'):
        with pytest.raises(images.UnreadableImage, match=name):
            images.load_rgb(odd_folder / name)
    assert issubclass(images.UnreadableImage, ds.DatasetError)


def test_missing_and_unreadable_folders_raise(tmp_path: Path) -> None:
    with pytest.raises(ds.DatasetError, match='trainA'):
        ds.domain_images(tmp_path, 'trainA')
    (tmp_path / 'trainB').mkdir()
    (tmp_path / 'trainB' / 'bad.png').write_bytes(b'nope')
    with pytest.raises(ds.DatasetError, match='no readable image'):
        ds.domain_images(tmp_path, 'trainB')
    (tmp_path / 'testA').mkdir()
    with pytest.raises(ds.DatasetError, match='no readable image'):
        ds.domain_images(tmp_path, 'testA')


def test_resolve_dataset_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / 'dataset' / 'demo').mkdir(parents=True)
    (tmp_path / 'elsewhere').mkdir()
    assert ds.resolve_dataset_root('demo') == Path('dataset/demo')
    assert ds.resolve_dataset_root(str(tmp_path / 'elsewhere')) == tmp_path / 'elsewhere'
    with pytest.raises(ds.DatasetError, match=r'nothing.*trainA,trainB,testA,testB'):
        ds.resolve_dataset_root('nothing')


# ---------------------------------------------------------------------------------------------------
# Transforms


def test_train_transform_is_pt_flip_resize_crop() -> None:
    """The output equals some 16×16 crop of the (maybe flipped) image resized to 46×46."""
    gradient = np.tile(np.arange(0, 240, 12, dtype=np.uint8), (20, 1))
    img = Image.fromarray(np.stack([gradient, gradient.T, np.full_like(gradient, 9)], axis=-1))
    transform, flips = ds.train_transform(16), 0
    for seed in range(40):
        out = transform(img, torch.Generator().manual_seed(seed))
        candidates = {}
        for flipped in (False, True):
            source = img.transpose(Image.FLIP_LEFT_RIGHT) if flipped else img
            big = ds.test_transform(46)(source)
            for top in range(31):
                for left in range(31):
                    if torch.equal(big[:, top:top + 16, left:left + 16], out):
                        candidates[flipped] = True
        assert len(candidates) == 1
        flips += candidates.get(True, False)
    assert 10 <= flips <= 30
    again = transform(img, torch.Generator().manual_seed(3))
    assert torch.equal(again, transform(img, torch.Generator().manual_seed(3)))


def test_random_resized_crop_keeps_square_scale() -> None:
    transform = ds.TrainTransform(16, aug_prob=1.0)
    for seed in range(20):
        top, left, side = transform._rrc_box(40, 30, torch.Generator().manual_seed(seed))
        assert round((0.748 * 1200) ** 0.5) <= side <= 30
        assert 0 <= top <= 30 - side and 0 <= left <= 40 - side


# ---------------------------------------------------------------------------------------------------
# Histogram matching


def reference_match(src: np.ndarray, ref: np.ndarray, ratio: float) -> np.ndarray:
    """Direct per-channel computation from SPEC §1.5, one value at a time."""
    out = np.empty_like(src)
    for c in range(3):
        cdf_src = np.cumsum(np.bincount(src[..., c].ravel(), minlength=256)) / src[..., c].size
        cdf_ref = np.cumsum(np.bincount(ref[..., c].ravel(), minlength=256)) / ref[..., c].size
        target = (1 - ratio) * cdf_src + ratio * cdf_ref
        lut = [min(u for u in range(256) if target[u] >= cdf_src[v] or u == 255) for v in range(256)]
        out[..., c] = np.array(lut, np.uint8)[src[..., c]]
    return out


def test_match_histograms_rgb_matches_direct_computation() -> None:
    rng = np.random.default_rng(0)
    src = rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)
    ref = rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)
    for ratio in (1.0, 0.5, 0.25):
        assert np.array_equal(ds.match_histograms(src, ref, 'rgb', ratio), reference_match(src, ref, ratio))
    # Same pixel count and distinct source values: ratio 1 copies the reference histogram exactly.
    src = rng.permutation(np.arange(48, dtype=np.uint8) * 5).reshape(4, 4, 3)
    out = ds.match_histograms(src, ref, 'rgb', 1.0)
    for c in range(3):
        assert sorted(out[..., c].ravel().tolist()) == sorted(ref[..., c].ravel().tolist())
        assert np.array_equal(np.argsort(out[..., c].ravel(), kind='stable'),
                              np.argsort(src[..., c].ravel(), kind='stable'))  # order kept


def test_match_histograms_ratio_zero_is_identity_and_colour_modes() -> None:
    rng = np.random.default_rng(1)
    src = rng.integers(0, 256, (6, 5, 3), dtype=np.uint8)
    ref = rng.integers(0, 256, (3, 7, 3), dtype=np.uint8)
    assert np.array_equal(ds.match_histograms(src, ref, 'rgb', 0.0), src)
    warm = np.full((4, 4, 3), (220, 120, 40), np.uint8)
    cool = np.full((4, 4, 3), (40, 120, 220), np.uint8)
    for mode in ('hsv', 'hsl'):
        out = ds.match_histograms(warm, cool, mode, 1.0)
        # solid -> the reference's colour, up to the 8-bit HSV/HLS round trip
        assert np.abs(out.astype(int) - cool).max() <= 6
        assert np.abs(out.astype(int) - warm).max() > 150
    with pytest.raises(ValueError, match='mode'):
        ds.match_histograms(src, ref, 'lab')


# ---------------------------------------------------------------------------------------------------
# The training stream


def test_stream_is_reproducible_and_resumable(tmp_path: Path) -> None:
    make_domains(tmp_path)
    kwargs = dict(img_size=8, batch_size=3, seed=7, aug_prob=0.5)
    reference = take(ds.build_train_stream(tmp_path, **kwargs), 6)
    assert_same_batches(reference, take(ds.build_train_stream(tmp_path, **kwargs), 6))
    resumed = ds.build_train_stream(tmp_path, start_step=3, **kwargs)
    assert_same_batches(reference[3:], take(resumed, 3))
    workers = ds.build_train_stream(tmp_path, start_step=3, num_workers=2, **kwargs)
    assert_same_batches(reference[3:], take(workers, 3))
    other_seed = take(ds.build_train_stream(tmp_path, **{**kwargs, 'seed': 8}), 6)
    assert not all(torch.equal(a['A'], b['A']) for a, b in zip(reference, other_seed))
    batch = reference[0]
    assert batch.keys() == {'A', 'B'} and batch['A'].shape == (3, 3, 8, 8)
    assert batch['A'].min() >= -1 and batch['A'].max() <= 1


def test_stream_reads_shuffled_epochs(tmp_path: Path) -> None:
    make_domains(tmp_path, n_a=5, n_b=7)
    stream = ds.build_train_stream(tmp_path, 8, batch_size=1, seed=0)
    batches = take(stream, 35)
    seen_a = [colour_of(b['A'])[0] for b in batches]
    seen_b = [colour_of(b['B'])[0] for b in batches]
    for epoch in range(7):  # every epoch of A shows each of its 5 images once
        assert sorted(seen_a[5 * epoch:5 * epoch + 5]) == sorted(COLOURS[:5])
    for epoch in range(5):
        assert sorted(seen_b[7 * epoch:7 * epoch + 7]) == sorted(COLOURS[:7])
    assert seen_a[:5] != seen_a[5:10]  # each epoch has its own permutation


def test_ranks_split_the_global_stream(tmp_path: Path) -> None:
    make_domains(tmp_path, n_a=8, n_b=8)
    single = take(ds.build_train_stream(tmp_path, 8, batch_size=4, seed=1), 2)
    ranks = [take(ds.build_train_stream(tmp_path, 8, batch_size=2, seed=1, rank=r, world_size=2), 1)[0]
             for r in range(2)]
    assert set(colour_of(ranks[0]['A'])).isdisjoint(colour_of(ranks[1]['A']))
    # Positions: rank r at step t = global samples (2t + r)·2 .. +1, i.e. step 0 of batch 4 splits in two.
    assert colour_of(ranks[0]['A']) + colour_of(ranks[1]['A']) == colour_of(single[0]['A'])
    with pytest.raises(ValueError, match='rank'):
        ds.build_train_stream(tmp_path, 8, batch_size=2, seed=1, rank=2, world_size=2)


def test_histogram_matching_in_stream(tmp_path: Path) -> None:
    make_domains(tmp_path)
    common = dict(img_size=8, batch_size=4, seed=2, match_histograms=True, match_mode='rgb')
    to_a = next(ds.build_train_stream(tmp_path, match_prob=1.0, **common))
    assert torch.equal(to_a['B'], to_a['A'])  # solid B takes solid A's colour exactly
    to_b = next(ds.build_train_stream(tmp_path, match_prob=0.0, **common))
    assert torch.equal(to_b['A'], to_b['B'])
    plain = next(ds.build_train_stream(tmp_path, 8, 4, 2))
    assert torch.equal(plain['A'], to_a['A']) and torch.equal(plain['B'], to_b['B'])


def make_groups(root: Path) -> None:
    for domain in 'AB':
        for group in (0, 1, 2):
            for i in range(2):
                solid(root / f'train{domain}' / str(group) / f'{i}.png', COLOURS[2 * group + i])


def test_groups_labels_and_round_robin(tmp_path: Path) -> None:
    make_groups(tmp_path)
    paths, labels = ds.domain_images(tmp_path, 'trainA', [1, 0])
    assert labels == [1, 1, 0, 0] and [p.parent.name for p in paths] == ['1', '1', '0', '0']
    stream = ds.build_train_stream(tmp_path, 8, batch_size=2, seed=0, groups=[0, 1])
    for step, batch in enumerate(take(stream, 6)):
        group = step % 2
        assert batch['group_A'].tolist() == [group, group] and batch['group_B'].tolist() == [group, group]
        assert batch['group_A'].dtype == torch.int64
        for key in 'AB':
            assert set(colour_of(batch[key])) == {COLOURS[2 * group], COLOURS[2 * group + 1]}
    balanced = take(ds.build_train_stream(tmp_path, 8, batch_size=4, seed=0, groups=[0, 2],
                                          group_sampling='balanced'), 5)
    labels_a = torch.cat([b['group_A'] for b in balanced])
    assert torch.equal(labels_a, torch.cat([b['group_B'] for b in balanced]))
    assert set(labels_a.tolist()) == {0, 2}
    for batch in balanced:
        for label, colour in zip(batch['group_A'].tolist(), colour_of(batch['A'])):
            assert colour in (COLOURS[2 * label], COLOURS[2 * label + 1])


def test_missing_or_empty_group_raises(tmp_path: Path) -> None:
    make_groups(tmp_path)
    with pytest.raises(ds.DatasetError, match='group 3'):
        ds.build_train_stream(tmp_path, 8, 1, 0, groups=[0, 3])
    (tmp_path / 'trainB' / '4').mkdir()
    with pytest.raises(ds.DatasetError, match=r'trainB[/\\]4'):
        ds.domain_images(tmp_path, 'trainB', [4])


# ---------------------------------------------------------------------------------------------------
# Images that break mid-run, and signals to the workers (issue 17)


def palette(n: int) -> list[tuple[int, int, int]]:
    """n distinct solid colours."""
    return [(40 * (i % 6), 40 * (i // 6 % 6), 255 - 40 * (i // 36)) for i in range(n)]


def break_file(path: Path, how: str = 'truncate') -> None:
    if how == 'delete':
        path.unlink()
    else:
        path.write_bytes(path.read_bytes()[:len(path.read_bytes()) // 2])
    with pytest.raises(images.UnreadableImage):
        images.load_rgb(path)


def ten_each(root: Path) -> list[tuple[int, int, int]]:
    colours = palette(10)
    for i, colour in enumerate(colours):
        solid(root / 'trainA' / f'a{i}.png', colour)
        solid(root / 'trainB' / f'b{i}.png', colour)
    return colours


@pytest.mark.parametrize('how', ['truncate', 'delete'])
def test_image_broken_mid_run_is_replaced_from_its_domain_and_warned_once(tmp_path: Path, capfd, how) -> None:
    colours = ten_each(tmp_path)
    kwargs = dict(img_size=8, batch_size=2, seed=5)
    stream = ds.build_train_stream(tmp_path, num_workers=2, **kwargs)
    draws = [step for step in range(15) for spec in stream.loader.batch_sampler.batch(step) if spec.index_A == 3]
    assert {step % 2 for step in draws} == {0, 1}   # both workers meet the broken file
    broken = tmp_path / 'trainA' / 'a3.png'
    break_file(broken, how)   # listed as readable; broken before any worker reads it
    batches = take(stream, 15)
    seen = [c for batch in batches for c in colour_of(batch['A'])]
    assert len(seen) == 30 and colours[3] not in seen and set(seen) <= set(colours)
    assert batches[0].keys() == {'A', 'B'}
    err = capfd.readouterr().err
    assert err.count(str(broken)) == 1 and 'skipping unreadable image' in err
    if how == 'truncate':   # a broken file keeps its index: a rerun or a resumed run draws the same
        assert_same_batches(batches, take(ds.build_train_stream(tmp_path, **kwargs), 15))
        assert_same_batches(batches[6:], take(ds.build_train_stream(tmp_path, start_step=6, **kwargs), 9))


def test_replacement_keeps_the_group_and_the_pair(tmp_path: Path) -> None:
    colours = palette(10)
    for group in (1, 2):
        for i in range(5):
            for domain in 'AB':
                solid(tmp_path / f'train{domain}' / str(group) / f's{i}.png', colours[5 * (group - 1) + i])
    stream = ds.build_train_stream(tmp_path, 8, batch_size=2, seed=1, groups=[1, 2], paired=True)
    break_file(tmp_path / 'trainA' / '1' / 's0.png')
    break_file(tmp_path / 'trainB' / '2' / 's1.png', 'delete')
    for batch in take(stream, 20):
        seen_a, seen_b = colour_of(batch['A']), colour_of(batch['B'])
        assert seen_a == seen_b   # the pair is replaced together
        assert not {colours[0], colours[6]} & set(seen_a)
        assert batch['group_A'].tolist() == batch['group_B'].tolist()
        for group, colour in zip(batch['group_A'].tolist(), seen_a):
            assert colours.index(colour) // 5 + 1 == group


def test_too_many_unreadable_images_stop_the_stream_in_one_line(tmp_path: Path) -> None:
    ten_each(tmp_path)
    stream = ds.build_train_stream(tmp_path, 8, batch_size=2, seed=0)
    break_file(tmp_path / 'trainA' / 'a0.png')
    break_file(tmp_path / 'trainA' / 'a1.png', 'delete')
    with pytest.raises(ds.TooManyUnreadable) as raised:
        take(stream, 20)
    message = str(raised.value)
    assert '\n' not in message and isinstance(raised.value, errors.UserError)
    assert '2 of 10 images in' in message and 'a0.png, a1.png' in message and '10%' in message
    solid(tmp_path / 'trainA' / 'a1.png', (1, 2, 3))
    break_file(tmp_path / 'trainA' / 'a2.png')
    with pytest.raises(ds.TooManyUnreadable, match='2 of 10 images'):   # at start-up, before any step
        ds.build_train_stream(tmp_path, 8, batch_size=2, seed=0)


def test_a_group_with_nothing_readable_left_stops_the_stream(tmp_path: Path) -> None:
    for group, count in ((1, 11), (2, 1)):
        for i in range(count):
            for domain in 'AB':
                solid(tmp_path / f'train{domain}' / str(group) / f'{i}.png', COLOURS[i % 9])
    stream = ds.build_train_stream(tmp_path, 8, batch_size=1, seed=0, groups=[1, 2])
    break_file(tmp_path / 'trainA' / '2' / '0.png')   # 1 of 12: within the share, but all of group 2
    with pytest.raises(ds.TooManyUnreadable, match=r'no image in \S*trainA[/\\]2 can be read'):
        take(stream, 4)


def test_workers_ignore_the_stop_signals(tmp_path: Path) -> None:
    """A signal to the whole process group reaches the workers too; only the main process acts on it."""
    make_domains(tmp_path)
    reference = take(ds.build_train_stream(tmp_path, 8, 2, 0), 6)
    stream = ds.build_train_stream(tmp_path, 8, 2, 0, num_workers=2)
    first = take(stream, 2)
    workers = stream._iterator._workers
    for worker in workers:
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1):   # SIGUSR1: SLURM's --signal
            os.kill(worker.pid, sig)
    time.sleep(0.5)
    assert all(worker.is_alive() for worker in workers)
    assert_same_batches(reference, first + take(stream, 4))


# ---------------------------------------------------------------------------------------------------
# Blur images


def checker(path: Path) -> Path:
    board = np.kron(np.indices((4, 4)).sum(axis=0) % 2, np.ones((8, 8))).astype(np.uint8) * 200
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.stack([board, board // 2, 255 - board], axis=-1)).save(path)
    return path


def test_blur_edges_changes_only_edge_neighbourhoods() -> None:
    img = np.full((32, 32, 3), 90, np.uint8)
    assert np.array_equal(ds.blur_edges(img), img)  # no edges, nothing to blur
    img[:, 16:] = 220
    out = ds.blur_edges(img)
    changed = np.argwhere((out != img).any(axis=-1))[:, 1]
    assert changed.size > 0 and changed.min() >= 12 and changed.max() <= 19  # within the dilated edge
    assert (out[:, :10] == 90).all() and (out[:, 22:] == 220).all()


def test_make_blur_images_once(tmp_path: Path) -> None:
    src, dst = tmp_path / 'trainA', tmp_path / 'blurA'
    checker(src / 'one.png')
    checker(src / 'sub' / 'two.png')
    (src / 'readme.txt').write_text('ignored')
    assert ds.make_blur_images(src, dst) == 2
    assert sorted(p.relative_to(dst).as_posix() for p in dst.rglob('*')
                  if p.is_file()) == ['one.png', 'sub/two.png']
    written = np.asarray(Image.open(dst / 'one.png'))
    assert np.array_equal(written, ds.blur_edges(np.asarray(Image.open(src / 'one.png'))))
    assert ds.make_blur_images(src, dst) == 0
    (dst / 'one.png').unlink()
    assert ds.make_blur_images(src, dst) == 1


def test_stream_with_blur_images(tmp_path: Path) -> None:
    make_domains(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter('error')
        stream = ds.build_train_stream(tmp_path, 8, batch_size=2, seed=0, blur_root=tmp_path / 'blur')
        batch = next(stream)
    assert len(list((tmp_path / 'blur' / 'blurA').iterdir())) == 5
    assert len(list((tmp_path / 'blur' / 'blurB').iterdir())) == 7
    assert batch.keys() == {'A', 'B', 'blur_A', 'blur_B'}
    assert batch['blur_A'].shape == (2, 3, 8, 8) and batch['blur_B'].shape == (2, 3, 8, 8)
    assert all(c in COLOURS[:5] for c in colour_of(batch['blur_A']))  # solid images: no edges


# ---------------------------------------------------------------------------------------------------
# Test loader


def test_test_loader_names_and_order(tmp_path: Path) -> None:
    folder = tmp_path / 'testA'
    solid(folder / 'img1.png', COLOURS[0], size=10)
    solid(folder / 'sub' / 'img2.jpg', COLOURS[1], size=20)
    solid(folder / 'a0.PNG', COLOURS[2], size=5)
    loader = ds.build_test_loader(folder, 8, batch_size=2)
    batches = list(loader)
    assert all(isinstance(batch_names, list) for _, batch_names in batches)
    names = [name for _, batch_names in batches for name in batch_names]
    assert names == ['a0', 'img1', 'sub/img2']
    images = torch.cat([images for images, _ in batches])
    assert images.shape == (3, 3, 8, 8)
    assert colour_of(images)[:2] == [COLOURS[2], COLOURS[0]]
    with pytest.raises(ds.DatasetError, match='missing'):
        ds.build_test_loader(tmp_path / 'missing', 8)


# ---------------------------------------------------------------------------------------------------
# TF's pipeline (--augment_flag) and paired data (--paired)


def _gradient_image(size: int = 20) -> Image.Image:
    gradient = np.tile(np.arange(0, 12 * size, 12, dtype=np.uint8), (size, 1))
    return Image.fromarray(np.stack([gradient, gradient.T, np.full_like(gradient, 9)], axis=-1))


def test_tf_transform_without_augmentation_is_a_resize() -> None:
    img = _gradient_image()
    out = ds.train_transform(16, augment_flag=False)(img, torch.Generator().manual_seed(0))
    assert torch.equal(out, ds.test_transform(16)(img))


def test_tf_transform_augments_half_the_images_with_flip_resize_crop() -> None:
    """Augmented outputs equal a 16×16 crop of the (maybe flipped) 16-px image resized to 31 (s+15)."""
    img = _gradient_image()
    plain = ds.test_transform(16)(img)
    small = img.resize((16, 16), Image.BILINEAR)
    transform, augmented, flips = ds.train_transform(16, augment_flag=True), 0, 0
    for seed in range(40):
        out = transform(img, torch.Generator().manual_seed(seed))
        if torch.equal(out, plain):
            continue
        augmented += 1
        found = set()
        for flipped in (False, True):
            source = small.transpose(Image.FLIP_LEFT_RIGHT) if flipped else small
            big = ds.test_transform(31)(source)
            found |= {flipped for top in range(16) for left in range(16)
                      if torch.equal(big[:, top:top + 16, left:left + 16], out)}
        assert len(found) == 1, seed
        flips += found.pop()
    assert 10 <= augmented <= 30 and 0 < flips < augmented   # a coin per image, not one per run
    assert ds.TFTrainTransform(256, True).augment_size == 286 and ds.TFTrainTransform(128, True).augment_size == 143


def _paired_folders(root: Path, names: list[str]) -> None:
    """trainA and trainB hold the same images under the same names (B as .bmp, A as .png)."""
    for i, name in enumerate(names):
        image = _gradient_image().rotate(90 * i)
        (root / 'trainA' / name).parent.mkdir(parents=True, exist_ok=True)
        (root / 'trainB' / name).parent.mkdir(parents=True, exist_ok=True)
        image.save(root / 'trainA' / f'{name}.png')
        image.save(root / 'trainB' / f'{name}.bmp')


@pytest.mark.parametrize('augment_flag', [None, True])
def test_paired_stream_draws_same_stem_same_crop_and_flip(tmp_path: Path, augment_flag) -> None:
    _paired_folders(tmp_path, ['x', 'y', 'sub/z', 'w'])
    kwargs = dict(img_size=16, batch_size=2, seed=3, augment_flag=augment_flag)
    for batch in take(ds.build_train_stream(tmp_path, paired=True, **kwargs), 6):
        assert torch.equal(batch['A'], batch['B'])   # same file content, same draws
    unpaired = take(ds.build_train_stream(tmp_path, **kwargs), 6)
    assert not all(torch.equal(b['A'], b['B']) for b in unpaired)


def test_pair_by_stem_orders_b_like_a_and_reports_mismatches(tmp_path: Path) -> None:
    a = [tmp_path / 'trainA' / n for n in ('k.png', 'sub/m.png', 'z.jpg')]
    b = [tmp_path / 'trainB' / n for n in ('z.png', 'k.bmp', 'sub/m.jpg')]
    assert ds.pair_by_stem(tmp_path, a, b) == [1, 2, 0]
    with pytest.raises(ds.DatasetError, match=r'only in trainA: sub/m, z; only in trainB: none'):
        ds.pair_by_stem(tmp_path, a, b[1:2])
    with pytest.raises(ds.DatasetError, match='trainB has several files per name'):
        ds.pair_by_stem(tmp_path, a[:1], b[1:2] + [tmp_path / 'trainB' / 'k.png'])
