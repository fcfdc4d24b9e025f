"""paratune's BiCifParaformer and SeacoParaformer against FunASR 1.4.16's, with the same random weights,
on the padded batch of real clips (as test_parity does for Paraformer).

Every check is a max relative error (`relative_error`) under TOL, or exact equality for counts.

One documented difference (paratune/model/cif.py): in training, where the alphas are scaled to sum to
the target length, paratune's CIF fires the last target token; FunASR's fires it only when float
rounding leaves its integrator at or above 1. BiCif's and SeACo's CIF (funasr/models/bicif_paraformer/
cif_predictor.py `cif`) integrates frame by frame in float32 and misses it often (in this batch for two of
the seven clips with the small models, three with the large), leaving a zero acoustic embedding at the
eos position.
The loss checks therefore (1) compare the training CIF's embeddings wherever FunASR fired and check that
it missed only last tokens, (2) compare every loss term with paratune's losses computed with those
missed tokens zeroed as FunASR has them, on the whole batch, and (3) (small models) compare both
forward passes directly on a padded sub-batch of the clips where FunASR fires every token.
"""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import yaml

from paratune.model import build_paraformer
from paratune.model.timestamps import fire_weights
from tests.model.reference import funasr_model, relative_error, small_config
from tests.model.test_parity import clips  # noqa: F401 - the padded batch of real clips (a fixture)

TOL = 1e-4
FAMILY = ("bicif", "seaco")
SIZES = ["small", pytest.param("large", marks=pytest.mark.slow)]


def _close(name: str, ours: torch.Tensor, ref: torch.Tensor, tol: float = TOL):
    assert ours.shape == ref.shape, (name, ours.shape, ref.shape)
    err = relative_error(ours.float(), ref.float())
    print(f"{name}: {err:.2e}")
    assert err < tol, (name, err)


def _close_scalar(name: str, ours, ref, tol: float = TOL):
    ours, ref = float(ours), float(ref)
    err = abs(ours - ref) / max(abs(ref), 1e-12)
    print(f"{name}: {err:.2e} ({ours:.6g} vs {ref:.6g})")
    assert err < tol, (name, ours, ref)


def _config(shared_data, family: str, size: str) -> dict:
    config = yaml.safe_load((shared_data / "paraformer_family" / family / "config.yaml").read_text(encoding="utf-8"))
    return small_config(config) if size == "small" else config


def _pair(config: dict, vocab: int, seed: int = 0):
    """FunASR's model with random weights and paratune's with the same weights (strict load)."""
    torch.manual_seed(seed)
    ref = funasr_model(config, vocab)
    ours = build_paraformer(config, vocab, 560)
    assert [(k, v.shape) for k, v in ref.state_dict().items()] == \
           [(k, v.shape) for k, v in ours.state_dict().items()]
    ours.load_state_dict(ref.state_dict(), strict=True)
    return ref, ours


def _mask(enc, lengths):
    """FunASR's encoder_out_mask: (B, 1, T), True on real frames."""
    return (torch.arange(enc.size(1))[None, :] < lengths[:, None])[:, None, :]


# ---- hotwords ----------------------------------------------------------------------------------

def _hotword_spans(length: int, i: int) -> list[int]:
    """A fixed choice of hotword spans per utterance, in AudioDatasetHotword's `hotword_indx` form:
    [-1] none, [start, end] one hotword, [s1, e1, s2, e2] two (both ends inclusive)."""
    if length < 2 or i % 3 == 1:
        return [-1]
    if i % 3 == 2 and length > 12:
        return [1, 4, length - 6, length - 3]
    start = length // 4
    return [start, min(length - 1, start + 3)]


def _hotword_batch(text, text_lengths, no_bias: int):
    """hotword_pad, hotword_lengths, seaco_label_pad by FunASR's own AudioDatasetHotword.collator."""
    from funasr.datasets.audio_datasets.datasets import AudioDatasetHotword

    samples = [{"text": text[i, :n].clone(), "text_lengths": torch.tensor([n], dtype=torch.int32),
                "hotword_indx": _hotword_spans(n, i), "seaco_id": no_bias}
               for i, n in enumerate(text_lengths.tolist())]
    out = AudioDatasetHotword.collator(SimpleNamespace(int_pad_value=-1, float_pad_value=0.0), samples)
    assert torch.equal(out["text"], text[:, : int(text_lengths.max())])
    labels = out["seaco_label_pad"]
    assert out["hotword_pad"].size(0) > 2 and ((labels != no_bias) & (labels != -1)).any()
    return out["hotword_pad"], out["hotword_lengths"], out["seaco_label_pad"]


def _decode_hotwords(text_row: torch.Tensor, vocab: int, many: bool, seed: int) -> list[list[int]]:
    """Hotwords for one utterance (no [sos] entry): spans of its transcript plus random ones, 60 random
    ones when `many` (more than FunASR's nfilter=50, so its attention-score filter runs)."""
    g = torch.Generator().manual_seed(seed)
    n = len(text_row)
    words = [text_row[s: s + k].tolist() for s, k in ((0, 2), (n // 2, 3), (max(0, n - 4), 4)) if s < n]
    for _ in range(60 if many else 2):
        words.append(torch.randint(3, vocab - 1, (int(torch.randint(1, 6, (1,), generator=g)),), generator=g).tolist())
    return words


# ---- checks shared by both models ----------------------------------------------------------------

def _check_inference(ref, ours, feats, lengths, tag: str):
    """Encoder, CIF 1, the timestamp head and the decoder on the padded batch, FunASR's batched
    arithmetic (batch_invariant False). Returns what the later checks reuse."""
    with torch.no_grad():
        enc_ref, len_ref, _ = ref.encoder(feats, lengths)
        enc, enc_len = ours.encoder(feats, lengths)
        assert enc_len.tolist() == len_ref.tolist()
        _close(f"{tag} encoder output", enc, enc_ref)

        mask = _mask(enc_ref, len_ref)
        emb_ref, num_ref, alphas_ref, _, num2_ref = ref.predictor(enc_ref, None, mask, ignore_id=ref.ignore_id)
        emb, num, alphas, _, num2 = ours.predict(enc, enc_len)
        assert num.tolist() == num_ref.tolist()
        print(f"{tag} token counts: {num.tolist()}")
        _close(f"{tag} CIF alphas", alphas, alphas_ref)
        _close(f"{tag} acoustic embeddings", emb, emb_ref)
        _close(f"{tag} token_num2", num2, num2_ref)

        tokens = num_ref.round().long()
        _, _, us_alphas_ref, us_peaks_ref = ref.calc_predictor_timestamp(enc_ref, len_ref, tokens)
        us_alphas = ours.predictor.timestamp_alphas(enc, ours.frame_mask(enc, enc_len), tokens)
        us_peaks = fire_weights(us_alphas, ours.predictor.threshold - 1e-4)
        _close(f"{tag} us_alphas", us_alphas, us_alphas_ref)
        _close(f"{tag} us_peaks", us_peaks, us_peaks_ref)
        fired = us_peaks >= ours.predictor.threshold - 1e-4
        assert torch.equal(fired, us_peaks_ref >= ref.predictor.threshold - 1e-4)

        logp_ref, _ = ref.cal_decoder_with_predictor(enc_ref, len_ref, emb_ref, tokens)
        logp = torch.log_softmax(ours.decoder(enc, enc_len, emb, tokens), -1)
        _close(f"{tag} decoder log-probs", logp, logp_ref)
    return enc_ref, len_ref, enc, enc_len


def _training_cif(ref, ours, enc_ref, len_ref, enc, enc_len, text, text_lengths, tag: str):
    """Both training-path CIFs (alphas scaled to the targets). Returns paratune's `predict` result and
    `missed` (B, U): target tokens FunASR's CIF did not fire (zero embedding there); only last tokens."""
    from funasr.models.transformer.utils.add_sos_eos import add_sos_eos

    _, ys_pad = add_sos_eos(text[:, : int(text_lengths.max())], ref.sos, ref.eos, ref.ignore_id)
    with torch.no_grad():
        emb_ref, num_ref, alphas_ref, fires_ref, num2_ref = ref.predictor(enc_ref, ys_pad, _mask(enc_ref, len_ref),
                                                                          ignore_id=ref.ignore_id)
    ys = ours.targets(text, text_lengths)
    ys_lengths = text_lengths + 1
    assert torch.equal(ys[:, : ys_pad.size(1)], ys_pad)
    predicted = ours.predict(enc, enc_len, ys_lengths, ys.size(1))
    _close(f"{tag} training token counts", predicted[1], num_ref)
    _close(f"{tag} training token_num2", predicted[4], num2_ref)
    _close(f"{tag} training CIF alphas", predicted[2], alphas_ref)
    positions = torch.arange(emb_ref.size(1))[None, :]
    fired = positions < (fires_ref >= ref.predictor.threshold).sum(1, keepdim=True)
    missed = (positions < ys_lengths[:, None]) & ~fired
    assert torch.equal(missed.nonzero()[:, 1], ys_lengths[missed.any(1)] - 1), "FunASR missed more than last tokens"
    assert torch.all(emb_ref[missed] == 0) and torch.all(predicted[0][missed].abs().amax(-1) > 0)
    print(f"{tag} training CIF: FunASR missed the last token of clips {missed.any(1).nonzero().flatten().tolist()} "
          f"(target lengths {ys_lengths[missed.any(1)].tolist()})")
    emb = predicted[0][:, : emb_ref.size(1)].masked_fill(missed[:, :, None], 0.0)
    _close(f"{tag} training acoustic embeddings (FunASR-fired tokens)", emb, emb_ref)
    return predicted, missed


def _check_losses(ref, ours, feats, lengths, text, text_lengths, hotwords: dict, funasr_terms: dict,
                  enc_ref, len_ref, enc, enc_len, tag: str):
    """Every loss term of FunASR's forward on the padded batch (`funasr_terms`: FunASR's value of each of
    paratune's stats keys) against paratune's losses with the tokens FunASR's CIF missed zeroed."""
    with torch.no_grad():
        loss_ref, stats_ref, weight_ref = ref(feats, lengths, text, text_lengths, **hotwords)
        loss, stats, weight = ours(feats, lengths, text, text_lengths, **hotwords)
        predicted, missed = _training_cif(ref, ours, enc_ref, len_ref, enc, enc_len, text, text_lengths, tag)
        as_funasr = (predicted[0].masked_fill(missed[:, :, None], 0.0), *predicted[1:])
        terms = ours.losses(enc, enc_len, ours.targets(text, text_lengths), text_lengths + 1, as_funasr, **hotwords)
    expected = {key: value(stats_ref) for key, value in funasr_terms.items()}
    for key, value in expected.items():
        _close_scalar(f"{tag} {key}", terms[key], value)
        if key in ("loss_pre", "loss_pre2") or not missed.any():  # not affected by the missed tokens
            _close_scalar(f"{tag} {key} (paratune's forward)", stats[key], value)
        else:
            err = abs(stats[key].item() - float(value)) / abs(float(value))
            print(f"{tag} {key}: paratune's forward, all tokens fired, differs by {err:.2e}")
    _close_scalar(f"{tag} total loss", terms["loss"], loss_ref)
    assert abs(terms["acc"].item() - float(stats_ref.get("acc", stats_ref.get("acc_att")))) < 1e-6
    assert weight.item() == weight_ref.item()
    return missed


def _check_forward_where_funasr_fires_all(ref, ours, feats, lengths, text, text_lengths, missed, hotword_batch,
                                          funasr_terms: dict, tag: str):
    """Both forward passes, compared directly, on a padded sub-batch where FunASR's CIF fires every
    token: the clips it missed a token of are dropped (again if, with the padding changed, it misses
    another one)."""
    keep = ~missed.any(1)
    while True:
        assert keep.sum() >= 3 and len(set(lengths[keep].tolist())) >= 3, "the sub-batch must mix lengths"
        sub_feats, sub_lengths = feats[keep][:, : int(lengths[keep].max())], lengths[keep]
        sub_text, sub_text_lengths = text[keep][:, : int(text_lengths[keep].max())], text_lengths[keep]
        with torch.no_grad():
            enc_ref, len_ref, _ = ref.encoder(sub_feats, sub_lengths)
            enc, enc_len = ours.encoder(sub_feats, sub_lengths)
            _, sub_missed = _training_cif(ref, ours, enc_ref, len_ref, enc, enc_len, sub_text, sub_text_lengths,
                                          f"{tag} sub-batch {keep.nonzero().flatten().tolist()}")
        if not sub_missed.any():
            break
        keep[keep.clone()] = ~sub_missed.any(1)
    hotwords = hotword_batch(sub_text, sub_text_lengths)
    with torch.no_grad():
        loss_ref, stats_ref, weight_ref = ref(sub_feats, sub_lengths, sub_text, sub_text_lengths, **hotwords)
        loss, stats, weight = ours(sub_feats, sub_lengths, sub_text, sub_text_lengths, **hotwords)
    for key, value in funasr_terms.items():
        _close_scalar(f"{tag} sub-batch {key} (paratune's forward)", stats[key], value(stats_ref))
    _close_scalar(f"{tag} sub-batch total loss", loss, loss_ref)
    assert weight.item() == weight_ref.item()


def _eval_pair(shared_data, family, size, vocab, seed=0):
    ref, ours = _pair(_config(shared_data, family, size), vocab, seed)
    if size == "large":
        assert sum(p.numel() for p in ours.parameters()) > 200e6
    ref.eval()
    ours.eval()
    ours.predictor.batch_invariant = False  # FunASR's batched arithmetic, padding frames included
    ref.sampling_ratio = ours.sampling_ratio = 0.0
    return ref, ours


# ---- BiCifParaformer -----------------------------------------------------------------------------

@pytest.mark.parametrize("size", SIZES)
def test_bicif_same_model_as_funasr_on_a_padded_batch(size, shared_data, clips):  # noqa: F811
    feats, lengths, text, text_lengths, vocab = clips
    ref, ours = _eval_pair(shared_data, "bicif", size, vocab)
    tag = f"bicif {size}"
    encoded = _check_inference(ref, ours, feats, lengths, tag)
    funasr_terms = {key: (lambda stats, key=key: stats[key]) for key in ("loss_att", "loss_pre", "loss_pre2", "loss")}
    missed = _check_losses(ref, ours, feats, lengths, text, text_lengths, {}, funasr_terms, *encoded, tag)
    if size == "small":  # (large: the whole-batch checks above, to keep its runtime modest)
        _check_forward_where_funasr_fires_all(ref, ours, feats, lengths, text, text_lengths, missed, lambda *_: {},
                                              funasr_terms, tag)


# ---- SeacoParaformer -----------------------------------------------------------------------------

@pytest.mark.parametrize("size", SIZES)
def test_seaco_same_model_as_funasr_on_a_padded_batch(size, shared_data, clips):  # noqa: F811
    feats, lengths, text, text_lengths, vocab = clips
    ref, ours = _eval_pair(shared_data, "seaco", size, vocab)
    assert ours.no_bias == ref.NO_BIAS < vocab
    tag = f"seaco {size}"
    encoded = _check_inference(ref, ours, feats, lengths, tag)
    enc_ref, len_ref, enc, enc_len = encoded

    def hotword_batch(text, text_lengths):
        pad, pad_lengths, labels = _hotword_batch(text, text_lengths, ref.NO_BIAS)
        return dict(hotword_pad=pad, hotword_lengths=pad_lengths, seaco_label_pad=labels)

    with torch.no_grad():  # SeACo's forward reports neither: FunASR's own functions for them
        _, _, _, _, loss_pre_ref = ref._calc_att_loss(enc_ref, len_ref, text, text_lengths)
        loss_pre2_ref = ref._calc_pre2_loss(enc_ref, len_ref, text, text_lengths)
    funasr_terms = {key: (lambda stats, key=key: stats[key]) for key in ("loss_seaco", "loss_att", "loss")}
    missed = _check_losses(ref, ours, feats, lengths, text, text_lengths, hotword_batch(text, text_lengths),
                           {**funasr_terms, "loss_pre": lambda _: loss_pre_ref, "loss_pre2": lambda _: loss_pre2_ref},
                           *encoded, tag)
    if size == "small":  # (large: the whole-batch checks above, to keep its runtime modest)
        _check_forward_where_funasr_fires_all(ref, ours, feats, lengths, text, text_lengths, missed, hotword_batch,
                                              funasr_terms, tag)

    # decoding with hotwords, one utterance at a time (FunASR's batch size), few and many (ASF) hotwords,
    # from each model's encoding of the padded batch cut to the utterance (compared above).
    # With random weights the hotword head almost never picks NO_BIAS: raise its bias (in both models)
    # so that about half the tokens keep the decoder's scores and both branches of the merge are compared.
    with torch.no_grad():
        ref.hotword_output_layer.bias[ref.NO_BIAS] += 3.3
        ours.hotword_output_layer.bias[ours.no_bias] += 3.3
    errors = {False: [], True: []}
    took_hotword_head = set()
    filter_changed = []
    for i in range(feats.size(0)):
        one_enc_ref, one_len_ref = enc_ref[i: i + 1, : int(len_ref[i])], len_ref[i: i + 1]
        one_enc, one_len = enc[i: i + 1, : int(enc_len[i])], enc_len[i: i + 1]
        with torch.no_grad():
            emb_ref, num_ref = ref.calc_predictor(one_enc_ref, one_len_ref)[:2]
            emb, num = ours.predict(one_enc, one_len)[:2]
            assert num.tolist() == num_ref.tolist()
            tokens = num_ref.round().long()
            assert tokens.min() >= 1
            plain = torch.log_softmax(ours.decoder(one_enc, one_len, emb, tokens), -1)
            for many in (False, True):
                words = _decode_hotwords(text[i, : int(text_lengths[i])], vocab, many, seed=i)
                scores_ref = ref._seaco_decode_with_ASF(one_enc_ref, one_len_ref, emb_ref, tokens,
                                                        hw_list=words + [[ref.sos]])
                scores = ours.decoder_scores(one_enc, one_len, emb, tokens, hotwords=words)
                if many:  # is the filter active? keeping every hotword scores otherwise
                    unfiltered = ours.decoder_scores(one_enc, one_len, emb, tokens, hotwords=words, nfilter=0)
                    filter_changed.append(not torch.equal(unfiltered, scores))
                assert scores.shape == scores_ref.shape
                errors[many].append(relative_error(scores, scores_ref))
                assert torch.equal(scores.argmax(-1), scores_ref.argmax(-1))
                # where the hotword head's choice was taken the scores are not the decoder's
                took_hotword_head.update((scores != plain).any(-1).flatten().tolist())
    for many, errs in errors.items():
        print(f"{tag} hotword decoding ({'63-65, ASF on' if many else '3-5'} hotwords): {max(errs):.2e}")
        assert max(errs) < TOL
    assert took_hotword_head == {True, False}, "both the decoder's and the hotword head's choices must occur"
    assert any(filter_changed)


# ---- CIF with weights above 1 (training with a predictor that undercounts) ------------------------

@pytest.mark.parametrize("seed", range(4))
def test_v3_cif_carries_a_second_crossing_to_the_next_frame_as_funasr(funasr, seed):
    """Where one frame's weight crosses two integers, BiCif/SeACo's FunASR CIF (the loop `cif`) fires
    the second token at the next frame; CifPredictorV3's CIF (carry=True) does the same, cif_v1's
    way (carry=False, Paraformer's) loses it."""
    from funasr.models.bicif_paraformer.cif_predictor import cif as loop_cif
    from paratune.model.cif import cif

    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(4, 50, 8, generator=g)
    alphas = torch.rand(4, 50, generator=g) ** 2 * 1.8  # many frames above 1: debts pile up over runs
    alphas[:, -5:] = 0.0  # room to fire what is owed before the end
    h1, a1 = hidden.clone().requires_grad_(), alphas.clone().requires_grad_()
    h2, a2 = hidden.clone().requires_grad_(), alphas.clone().requires_grad_()
    emb, fires = cif(h1, a1, carry=True)
    emb_ref, fires_ref = loop_cif(h2, a2, 1.0)
    _close("carried CIF embeddings", emb, emb_ref)
    _close("carried CIF integrator", fires, fires_ref)
    assert (a1 > 1).any() and not torch.equal(cif(hidden, alphas)[0], emb.detach())
    w = torch.randn(emb.shape, generator=g)
    (emb * w).sum().backward()
    (emb_ref * w).sum().backward()
    _close("carried CIF hidden gradient", h1.grad, h2.grad)
    _close("carried CIF alphas gradient", a1.grad, a2.grad)


# ---- the timestamp head, batch-invariant (the default) --------------------------------------------

@pytest.mark.parametrize("family", FAMILY)
def test_default_timestamps_equal_funasr_batch_of_one(family, shared_data, clips):  # noqa: F811
    """By default the timestamp head (packed BLSTM) gives each utterance what FunASR gives it alone."""
    feats, lengths, _, _, vocab = clips
    ref, ours = _pair(_config(shared_data, family, "small"), vocab, seed=1)
    ref.eval()
    ours.eval()
    assert ours.predictor.batch_invariant
    times = ours.predictor.upsample_times
    a_err, p_err = [], []
    with torch.no_grad():
        enc, enc_len = ours.encoder(feats, lengths)
        num = ours.predict(enc, enc_len)[1]
        tokens = num.round().long()
        per_utterance = ours.timestamp_weights(enc, enc_len, tokens)
        us_alphas = ours.predictor.timestamp_alphas(enc, ours.frame_mask(enc, enc_len), tokens)
        us_peaks = fire_weights(us_alphas, ours.predictor.threshold - 1e-4)
        for i in range(feats.size(0)):
            n = int(lengths[i])
            one_enc, one_len, _ = ref.encoder(feats[i: i + 1, :n], lengths[i: i + 1])
            one_num = ref.calc_predictor(one_enc, one_len)[1]
            assert num[i].item() == one_num.item()
            _, _, a_ref, p_ref = ref.calc_predictor_timestamp(one_enc, one_len, one_num.round().long())
            m = int(one_len) * times
            assert a_ref.shape[1] == m
            a_err.append(relative_error(us_alphas[i, :m], a_ref[0]))
            p_err.append(relative_error(us_peaks[i, :m], p_ref[0]))
            assert torch.equal(per_utterance[i][0], us_alphas[i, :m])
            assert torch.equal(per_utterance[i][1], us_peaks[i, :m])
            assert torch.equal(us_peaks[i, :m] >= 1 - 1e-4, p_ref[0] >= 1 - 1e-4)
    print(f"{family} batch-invariant us_alphas: {max(a_err):.2e}, us_peaks: {max(p_err):.2e}")
    assert max(a_err) < TOL and max(p_err) < TOL


# ---- gradients -------------------------------------------------------------------------------------

@pytest.mark.parametrize("family", FAMILY)
def test_gradients_match_funasr(family, shared_data, clips):  # noqa: F811
    """Gradients of the training loss on the padded batch; paratune's loss taken with the last tokens
    FunASR's CIF misses zeroed as FunASR has them (see the module docstring)."""
    feats, lengths, text, text_lengths, vocab = clips
    ref, ours = _eval_pair(shared_data, family, "small", vocab)
    hotwords = {}
    if family == "seaco":
        hotword_pad, hotword_lengths, seaco_label_pad = _hotword_batch(text, text_lengths, ref.NO_BIAS)
        hotwords = dict(hotword_pad=hotword_pad, hotword_lengths=hotword_lengths, seaco_label_pad=seaco_label_pad)
    ref(feats, lengths, text, text_lengths, **hotwords)[0].backward()
    with torch.no_grad():
        enc_ref, len_ref, _ = ref.encoder(feats, lengths)
    enc, enc_len = ours.encode(feats, lengths)
    predicted, missed = _training_cif(ref, ours, enc_ref, len_ref, enc, enc_len, text, text_lengths, f"{family} grad")
    as_funasr = (predicted[0].masked_fill(missed[:, :, None], 0.0), *predicted[1:])
    loss = ours.losses(enc, enc_len, ours.targets(text, text_lengths), text_lengths + 1, as_funasr, **hotwords)["loss"]
    loss.backward()
    grads_ref = dict(ref.named_parameters())
    worst = (0.0, "")
    for name, p in ours.named_parameters():
        g_ref = grads_ref[name].grad
        if g_ref is None:  # BiCif's decoder.embed: used only by the glancing sampler, off here
            assert p.grad is None, name
            continue
        err = relative_error(p.grad, g_ref)
        worst = max(worst, (err, name))
        assert err < 1e-3, name
    print(f"{family} gradients: max {worst[0]:.2e} ({worst[1]})")
