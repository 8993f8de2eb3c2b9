"""The built-in demo model: it ships with the package, loads through the real loaders, and its videos follow their
prompts, read back by the procedural generator's own measurement (`clips.matches`), including after a prompt
switch mid-stream. Chance level for the object color is 1 in 11."""

import dataclasses

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from longsana.config import bundled_folder, get_config
from longsana.demo.clips import (caption, caption_variant, colours_hold_from, matches, measure, parse_caption, render,
                                 render_timeline, sample_scene)
from longsana.demo.train import (TrainConfig, check, chunk_sizes, cut_latent, encoder_mean, generate, noise_levels,
                                 render_train_clip, render_vae_clip, splice_clips, switch_scene, train_cmd,
                                 train_latents, train_vae, video_batch)
from longsana.stream import Pipeline, video_frame
from longsana.vae import WanVAE

CAPTIONS, SWITCHES = 20, 8
ATTRIBUTES = ("color", "background", "count", "motion", "pan")


@pytest.fixture(scope="module")
def pipe():
    assert bundled_folder("demo") is not None, "the demo weights (longsana/assets/demo) are missing"
    return Pipeline.from_pretrained("demo", device="cpu")


def test_caption_variants_parse_back():
    rng = np.random.default_rng(0)
    changed = 0
    for _ in range(500):
        scene = sample_scene(rng)
        text = caption_variant(scene, rng)
        assert parse_caption(text)[0] == scene, text
        changed += text != caption(scene)
    assert changed > 50  # the variants do vary


def test_demo_model_loads_as_shipped(pipe):
    spec = get_config("demo")
    assert pipe.model.cfg == spec.transformer and pipe.vae.cfg == spec.vae
    assert pipe.model.proj_out.weight.dtype == torch.float32
    size = sum(f.stat().st_size for f in bundled_folder("demo").rglob("*") if f.is_file())
    assert size < 50 * 2**20
    emb, mask = pipe.text.encode([caption(sample_scene(np.random.default_rng(i))) for i in range(2)], 10)
    n = int(mask[0].sum())
    assert torch.nn.functional.cosine_similarity(emb[0, :n], emb[1, :n], dim=-1).min() < 0.8  # prompts differ


@pytest.mark.slow
def test_demo_videos_follow_their_captions(pipe):
    rng = np.random.default_rng(2024)
    hits = {k: 0 for k in ATTRIBUTES}
    for i in range(CAPTIONS):
        scene = sample_scene(rng)
        frames = np.concatenate(generate(pipe, caption(scene), chunks=2, seed=i))
        assert frames.shape == (25, 64, 64, 3)
        result = matches(frames, scene)
        for k in ATTRIBUTES:
            hits[k] += bool(result[k])
    acc = {k: v / CAPTIONS for k, v in hits.items()}
    print("demo accuracy over", CAPTIONS, "captions:", acc)
    assert acc["color"] >= 0.8, acc
    assert acc["background"] >= 0.8, acc


@pytest.mark.slow
def test_new_prompt_color_takes_over_within_two_chunks(pipe):
    rng = np.random.default_rng(7)
    before = after = later = 0
    for i in range(SWITCHES):
        a = sample_scene(rng)
        b = switch_scene(a, rng)
        while b.color == a.color:
            b = switch_scene(a, rng)
        chunks = generate(pipe, caption(a), chunks=4, seed=i, switch_to=caption(b), switch_after=1)
        before += measure(chunks[0]).fg_color.count(a.color) >= len(chunks[0]) / 2
        after += matches(chunks[2], b)["color"]  # the second chunk after the switch
        later += matches(chunks[3], b)["color"]  # reported only: how far the switch lags
    print(f"switches: old color held before {before}/{SWITCHES}, new color two chunks after {after}/{SWITCHES}, "
          f"three chunks after {later}/{SWITCHES}")
    assert before >= 0.75 * SWITCHES
    assert after >= 0.75 * SWITCHES


def test_decoder_only_training_keeps_the_latents(tmp_path):
    """--vae-decoder-only: the encoder (and so every latent a trained transformer knows) stays bit for bit, the
    decoder learns."""
    spec = get_config("demo")
    cfg = TrainConfig(out=tmp_path, device="cpu", vae_decoder_only=True, vae_steps=2, vae_batch=2, vae_latents=2,
                      vae_prefixes=(0,), vae_eval_clips=1)
    rng = np.random.default_rng(0)
    clips = torch.from_numpy(np.stack([render(sample_scene(rng), 5, 64, 64, seed=i) for i in range(4)]))
    torch.manual_seed(0)
    vae = WanVAE(spec.vae)
    before = {k: v.clone() for k, v in vae.state_dict().items()}
    train_vae(cfg, spec, clips, torch.device("cpu"), vae)
    after = vae.state_dict()
    frozen = [k for k in before if k.startswith(("encoder.", "quant_conv."))]
    trained = [k for k in before if k not in frozen]
    assert frozen and all(torch.equal(before[k], after[k]) for k in frozen)
    assert sum(not torch.equal(before[k], after[k]) for k in trained) >= len(trained) // 2


def test_vae_cut_clips_cut_where_the_loss_reaches():
    """--vae-cut-prob: a cut at a latent boundary inside a stretch with gradients (prefix p, then `latents` latent
    frames), every stretch and place in it drawn; without it the clips are those of earlier runs (the old draws)."""
    prefixes, latents = (0, 4, 8, 16), 4
    rng = np.random.default_rng(0)
    cuts = {cut_latent(rng, prefixes, latents) for _ in range(500)}
    assert cuts == {p + k for p in prefixes for k in range(1, latents)}

    def old_clip(seed, i, frames, size):  # render_vae_clip before the option, verbatim in its draws
        rng = np.random.default_rng((seed, 1, i))
        a = sample_scene(rng)
        segments = [(0, a)]
        if rng.random() < 0.2:
            segments.append((int(rng.integers(1, 400)), switch_scene(a, rng)))
        return render_timeline(segments, frames, size, size, seed=(seed, 2, i), start_frame=int(rng.integers(0, 400)))

    for i in range(12):  # 7 of them switch scene
        assert np.array_equal(render_vae_clip((0, i, 9, 32, 0.0, prefixes, latents)), old_clip(0, i, 9, 32))
    clip = render_vae_clip((0, 0, 77, 32, 1.0, prefixes, latents))
    assert clip.shape == (77, 32, 32, 3) and not np.array_equal(clip, old_clip(0, 0, 77, 32))


@pytest.mark.parametrize("prefix", [0, 2])
def test_spliced_latents_and_frames_cut_at_the_same_place(prefix):
    """--vae-splice-prob: from latent frame `cut` of the stretch on, both the latents and the video frames they
    decode to (the first latent of a clip is 1 frame, the others 4) are the partner's, and before it the clip's own."""
    B, latents, partner = 3, 4, [2, 0, 1]
    # each latent frame and each video frame labelled with (clip, latent frame of the stretch)
    z = (10 * torch.arange(B)[:, None] + torch.arange(latents)).float()[:, None, :, None, None].expand(B, 2, -1, 1, 1)
    frame_latent = [j for j in range(latents) for _ in range(video_frame(prefix + j + 1) - video_frame(prefix + j))]
    x = (10 * torch.arange(B)[:, None] + torch.tensor(frame_latent)).float()[:, None, :, None, None]
    for cut in range(1, latents):
        zs, xs = splice_clips(z, x, torch.tensor(partner), cut, prefix)
        for b in range(B):
            want = [10 * (partner[b] if j >= cut else b) + j for j in range(latents)]
            assert zs[b, 0, :, 0, 0].tolist() == want
            assert xs[b, 0, :, 0, 0].tolist() == [want[j] for j in frame_latent]


def test_switch_splice_latents_cut_at_the_switch():
    """--switch-splice: a switching clip's latents are its own up to the switch, then those of the clip with every
    frame before the switch replaced by the first new one (so they carry nothing of the old scene: without the
    option they do); clips without a switch keep their own."""
    spec = get_config("demo")
    sizes = chunk_sizes(spec, 4)
    torch.manual_seed(0)
    vae = WanVAE(spec.vae).eval()
    frames, _, switch = zip(*[render_train_clip((0, i, sizes, 32, p)) for i, p in enumerate([1.0, 0.0, 1.0])])
    switch = torch.tensor(switch)
    assert switch.tolist()[1] == 0 and all(switch[[0, 2]])
    plain = train_latents(vae, frames, switch, sizes, False, "cpu", batch=2)
    cut = train_latents(vae, frames, switch, sizes, True, "cpu", batch=2)
    assert torch.equal(plain[1], cut[1])
    for b in (0, 2):
        c = sum(sizes[:switch[b]])
        x = video_batch(torch.from_numpy(frames[b][None]), "cpu")
        x[:, :, :video_frame(c)] = x[:, :, video_frame(c)][:, :, None]
        alone = encoder_mean(vae, x)[0].to(torch.bfloat16)
        assert torch.equal(cut[b, :, :c], plain[b, :, :c]) and torch.equal(cut[b, :, c:], alone[:, c:])
        assert not torch.equal(plain[b, :, c], alone[:, c])


@pytest.mark.parametrize("focus", [0.0, 0.6])
def test_noise_levels_are_block_causal(focus):
    """Clean chunks, then one drawn level, then rising levels; never a noised chunk before a switch; with
    switch_focus, that fraction of switching clips is noised from the switch chunk on."""
    B, n = 4000, 6
    switch = torch.tensor([0, 1, 2, 3]).repeat(B // 4)
    t = noise_levels(B, n, switch, 3.0, torch.Generator().manual_seed(0), switch_focus=focus)
    assert t.dtype == torch.float32 and ((t >= 0) & (t <= 1000)).all() and (t == t.round()).all()
    noised = t > 0
    j = noised.float().argmax(1)  # the first noised chunk (every row has one: t_j >= 1)
    assert noised.any(1).all() and (noised == (torch.arange(n) >= j[:, None])).all()
    assert (t[:, 1:] >= t[:, :-1]).all()
    assert (j >= switch).all()
    at_switch = (j == switch)[switch > 0].float().mean().item()
    uniform = np.mean([1 / (n - k) for k in (1, 2, 3)])
    assert abs(at_switch - (focus + (1 - focus) * uniform)) < 0.03, at_switch


@pytest.mark.parametrize("options, message", [
    (dict(vae_seconds=0), "no VAE: train one (--vae-seconds / --vae-steps) or take one (--vae-from, --resume)"),
    (dict(vae_decoder_only=True), "--vae-decoder-only trains an existing VAE's decoder: give --vae-from or --resume"),
])
def test_a_config_that_cannot_train(tmp_path, options, message):
    """check() raises ValueError (library code); the command says the same as a usage error, before any work."""
    cfg = TrainConfig(out=tmp_path, device="cpu", **options)
    with pytest.raises(ValueError) as e:
        check(cfg)
    assert str(e.value) == message
    args = [f"--{k.replace('_', '-')}" + ("" if v is True else f"={v}") for k, v in options.items()]
    r = CliRunner().invoke(train_cmd, ["--out", str(tmp_path / "out"), "--device", "cpu", *args])
    assert r.exit_code == 2 and message in r.output and "Traceback" not in r.output, r.output
    assert not (tmp_path / "out").exists()


def test_train_options_default_to_train_config(tmp_path):
    """Every option's default is the TrainConfig field's: the command with only --out builds TrainConfig(out)."""
    params = {p.name: p.default for p in train_cmd.params if p.name != "out"}
    defaults = {f.name: f.default for f in dataclasses.fields(TrainConfig) if f.name in params}
    assert params == defaults and len(params) >= 20


def test_colours_hold_from_reads_a_switch_off_rendered_frames():
    rng = np.random.default_rng(3)
    a = sample_scene(rng)
    b = switch_scene(a, rng)
    while (b.color, b.background) == (a.color, a.background):
        b = switch_scene(a, rng)
    frames = render_timeline([(0, a), (20, b)], 48, 64, 64)
    assert colours_hold_from(frames[:20], a) == 0
    assert colours_hold_from(frames, a) is None  # a's colours leave at the switch
    assert colours_hold_from(frames, b) in (20, 21)  # a frame of slack at the cut
    assert colours_hold_from(frames[:20], b) is None
    # an object that travels out of the frame and back: no object color to read meanwhile, and no cause to fail
    s = parse_caption("a red circle moving left on a blue background")[0]
    frames = render(s, 40, 64, 64, seed=0)[10:]
    assert None in measure(frames).fg_color  # out of the frame for a few frames
    assert colours_hold_from(frames, s) == 0
