"""The BERT-style encoder (jaxllm/models/bert.py) against Hugging Face transformers' BERT, and
its weights in and out (jaxllm/weights/bert.py)."""

import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxllm.errors import JaxllmError
from jaxllm.models import bert as encoder_lib
from jaxllm.weights import bert as bert_weights

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

LENGTHS = [12, 7, 3]


def _hf_config(**extra):
  return transformers.BertConfig(
      vocab_size=97, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
      intermediate_size=64, max_position_embeddings=40, type_vocab_size=2, num_labels=3,
      hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, **extra)


def _randomised(model):
  """Every tensor random (biases and LayerNorms too), so a misplaced one shows."""
  torch.manual_seed(0)
  with torch.no_grad():
    for tensor in model.state_dict().values():
      if tensor.dtype.is_floating_point:
        tensor.copy_(torch.randn_like(tensor) * 0.2 + (1.0 if tensor.dim() == 1 else 0.0) * 0.1)
  return model.eval()


def _batch():
  """Three rows right-padded with id 0, segment ids 0 then 1, and the mask of real tokens."""
  rng = np.random.default_rng(0)
  tokens = rng.integers(1, 97, (3, 12))
  mask = np.arange(12)[None] < np.array(LENGTHS)[:, None]
  tokens = np.where(mask, tokens, 0)
  types = np.where(np.arange(12)[None] >= 4, 1, 0) * mask
  return tokens, mask, types


def _torch_run(model, tokens, mask, types, **kwargs):
  with torch.no_grad():
    return model(input_ids=torch.tensor(tokens), attention_mask=torch.tensor(mask.astype(np.int64)),
                 token_type_ids=torch.tensor(types), **kwargs)


def _converted(tmp_path, hf_class):
  """A randomised transformers model of `hf_class` saved and converted: (its logits on
  _batch(), the batch, our model, params, head, architecture, hidden states)."""
  hf = _randomised(hf_class(_hf_config()))
  hf.save_pretrained(tmp_path / "hf")
  tokens, mask, types = _batch()
  expected = _torch_run(hf, tokens, mask, types).logits.numpy()
  cfg, params, head, architecture = bert_weights.read_folder(tmp_path / "hf")
  model = encoder_lib.Encoder(cfg)
  params = bert_weights.complete(params, encoder_lib.init_params(model, jax.random.key(0)))
  hidden = model.apply({"params": params}, jnp.asarray(tokens), jnp.asarray(mask),
                       jnp.asarray(types), method=model.encode)
  return expected, (tokens, mask, types), model, params, head, architecture, hidden


def test_masked_lm_logits_match_transformers_and_export_round_trips(tmp_path):
  expected, batch, model, params, head, architecture, hidden = _converted(
      tmp_path, transformers.BertForMaskedLM)
  assert architecture == "BertForMaskedLM" and head is None
  ours = np.asarray(model.apply({"params": params}, hidden, method=model.mlm_logits))
  assert ours.shape == (3, 12, 97)
  np.testing.assert_allclose(ours, expected, rtol=0, atol=1e-4)  # padding positions too

  bert_weights.write_folder(tmp_path / "out", model.config, params, None, "BertForMaskedLM")
  reloaded = transformers.BertForMaskedLM.from_pretrained(tmp_path / "out").eval()
  np.testing.assert_allclose(_torch_run(reloaded, *batch).logits.numpy(), expected,
                             rtol=0, atol=1e-4)


def test_classifier_and_bare_model_match_transformers_and_round_trip(tmp_path):
  expected, batch, model, params, head, architecture, hidden = _converted(
      tmp_path, transformers.BertForSequenceClassification)
  assert architecture == "BertForSequenceClassification" and head["kernel"].shape == (32, 3)
  pooled = model.apply({"params": params}, hidden, method=model.pool)
  ours = np.asarray(pooled @ head["kernel"] + head["bias"])
  np.testing.assert_allclose(ours, expected, rtol=0, atol=1e-4)

  bert_weights.write_folder(tmp_path / "cls", model.config, params, head,
                            "BertForSequenceClassification")
  reloaded = transformers.BertForSequenceClassification.from_pretrained(tmp_path / "cls")
  np.testing.assert_allclose(_torch_run(reloaded.eval(), *batch).logits.numpy(),
                             expected, rtol=0, atol=1e-4)

  # The bare BertModel: hidden states and the pooler, keys without the "bert." prefix.
  bert_weights.write_folder(tmp_path / "bare", model.config, params, None, "BertModel")
  bare = transformers.BertModel.from_pretrained(tmp_path / "bare").eval()
  out = _torch_run(bare, *batch)
  real = batch[1].astype(bool)
  np.testing.assert_allclose(np.asarray(hidden)[real], out.last_hidden_state.numpy()[real],
                             rtol=0, atol=1e-4)
  np.testing.assert_allclose(np.asarray(pooled), out.pooler_output.numpy(), rtol=0, atol=1e-4)


def test_padding_changes_no_real_position():
  cfg = encoder_lib.EncoderConfig(vocab_size=50, context_length=24, n_layer=2, n_head=2,
                                  d_model=16)
  model = encoder_lib.Encoder(cfg)
  params = encoder_lib.init_params(model, jax.random.key(0))
  tokens = np.random.default_rng(1).integers(1, 50, (2, 9))
  encode = jax.jit(lambda x, m: model.apply({"params": params}, x, m, method=model.encode))

  def hidden(width, pad_ids):
    padded = np.concatenate([tokens, np.full((2, width - 9), pad_ids)], axis=1)
    mask = np.arange(width)[None] < 9
    return np.asarray(encode(jnp.asarray(padded), jnp.asarray(np.repeat(mask, 2, 0))))[:, :9]

  reference = hidden(9, 0)
  for width, pad_ids in ((12, 0), (24, 0), (16, 7), (24, 49)):
    np.testing.assert_allclose(hidden(width, pad_ids), reference, rtol=0, atol=1e-6)


def test_mean_pooling_counts_real_tokens_only():
  hidden = jnp.arange(24.0).reshape(2, 3, 4)
  mask = jnp.array([[1, 1, 0], [1, 0, 0]])
  np.testing.assert_allclose(encoder_lib.mean_pool(hidden, mask),
                             [[2.0, 3.0, 4.0, 5.0], [12.0, 13.0, 14.0, 15.0]])


def _one_line_error(capsys, argv):
  from jaxllm import cli
  capsys.readouterr()
  assert cli.main(argv) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1, err
  return err[0]


def test_convert_makes_encoder_runs_and_exports_them_back(tmp_path, capsys):
  from jaxllm import cli
  from jaxllm import config as config_lib
  from jaxllm.tasks import common, losses
  from jaxllm.training import rundir as run_io
  from jaxllm.weights import convert

  tokens, mask, _ = _batch()
  types = np.zeros_like(tokens)  # classification feeds one segment
  vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + [f"w{i}" for i in range(92)]
  for hf_class in (transformers.BertForSequenceClassification, transformers.BertForMaskedLM):
    folder, run, back = (tmp_path / hf_class.__name__ / name for name in ("hf", "run", "back"))
    hf = _randomised(hf_class(_hf_config()))
    hf.save_pretrained(folder)
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n")
    expected = _torch_run(hf, tokens, mask, types).logits.numpy()
    assert cli.main(["convert", "--from", str(folder), "--out", str(run)]) == 0

    config, model, params, tokenizer = run_io.load_finetuned(run)
    assert (config.model.architecture, tokenizer.name) == ("bert", "wordpiece")
    if hf_class is transformers.BertForSequenceClassification:
      assert (config.train.task, config.classifier.pooling) == ("classify", "cls")
      ours = losses.classifier_logits(params, {"tokens_BxL": tokens, "length_B": mask.sum(1)},
                                      backbone=model, pooling="cls")
      np.testing.assert_allclose(np.asarray(ours), expected, rtol=0, atol=1e-4)
    assert cli.main(["convert", "--from", str(run), "--out", str(back), "--to", "hf"]) == 0
    reloaded = hf_class.from_pretrained(back).eval()
    np.testing.assert_allclose(_torch_run(reloaded, tokens, mask, types).logits.numpy(),
                               expected, rtol=0, atol=1e-4)
    assert json.loads((back / "tokenizer.json").read_text())["model"]["type"] == "WordPiece"

  assert "holds an encoder (model.architecture=bert); generating text needs a GPT" in (
      _one_line_error(capsys, ["generate", "--workdir", str(run)]))
  config = config_lib.default_config()
  config.train.update(task="mlm", init_from=str(run))
  config.model.architecture = "gpt"
  with pytest.raises(JaxllmError, match="model.architecture=gpt, but train.init_from .* holds "
                                        "a bert model"):
    common.backbone(config)
  with pytest.raises(JaxllmError, match="is a BERT .encoder. folder, not GPT-2"):
    convert.import_gpt2(folder, tmp_path / "as_gpt")
  (folder / "vocab.txt").unlink()
  assert "holds neither tokenizer.json nor vocab.txt" in _one_line_error(
      capsys, ["convert", "--from", str(folder), "--out", str(tmp_path / "no_vocab")])


def test_one_line_errors(tmp_path):
  with pytest.raises(JaxllmError, match=r"model.safetensors not found"):
    (tmp_path / "config.json").write_text(json.dumps(_hf_config().to_dict()))
    bert_weights.read_folder(tmp_path)
  with pytest.raises(JaxllmError, match=r"model_type is 'gpt2', not 'bert'"):
    bert_weights.encoder_config({"model_type": "gpt2"}, "x")
  cfg = encoder_lib.EncoderConfig(vocab_size=10, context_length=8, n_layer=1, n_head=1,
                                  d_model=8)
  model = encoder_lib.Encoder(cfg)
  params = encoder_lib.init_params(model, jax.random.key(0))
  with pytest.raises(ValueError, match="sequence length 9 exceeds max_position_embeddings 8"):
    model.apply({"params": params}, jnp.ones((1, 9), jnp.int32), method=model.encode)


def test_masking_schedule_is_berts_and_a_function_of_seed_and_step():
  from jaxllm.tasks import mlm
  rng = np.random.default_rng(0)
  tokens = rng.integers(5, 1000, (10_000, 32))
  lengths = rng.integers(4, 33, 10_000)
  real = np.arange(32)[None] < lengths[:, None]
  maskable = real & (np.arange(32)[None] > 0)  # position 0 holds [CLS]
  tokens = np.where(real, tokens, 0)
  inputs, selected = (np.asarray(x) for x in mlm.mask_tokens(
      mlm.step_key(7, 3), jnp.asarray(tokens), jnp.asarray(maskable), mask_id=4,
      vocab_size=1000))
  assert not selected[~maskable].any()  # padding and specials never selected
  assert (inputs[~selected] == tokens[~selected]).all()
  assert abs(selected.sum() / maskable.sum() - 0.15) <= 0.005
  n = selected.sum()
  masked = (inputs == 4) & selected
  kept = (inputs == tokens) & selected
  randomised = selected & ~masked & ~kept
  assert abs(masked.sum() / n - 0.8) <= 0.01
  assert abs(randomised.sum() / n - 0.1) <= 0.01
  assert abs(kept.sum() / n - 0.1) <= 0.01  # (includes the 1-in-1000 random draws of itself)
  again = mlm.mask_tokens(mlm.step_key(7, 3), jnp.asarray(tokens), jnp.asarray(maskable),
                          mask_id=4, vocab_size=1000)
  assert (np.asarray(again[0]) == inputs).all()  # equal (seed, step): equal masks
  other = mlm.mask_tokens(mlm.step_key(7, 4), jnp.asarray(tokens), jnp.asarray(maskable),
                          mask_id=4, vocab_size=1000)
  assert (np.asarray(other[1]) != selected).any()


def test_masked_lm_loss_counts_selected_positions_only():
  from jaxllm.tasks import mlm
  cfg = encoder_lib.EncoderConfig(vocab_size=20, context_length=8, n_layer=1, n_head=2,
                                  d_model=8)
  model = encoder_lib.Encoder(cfg)
  params = encoder_lib.init_params(model, jax.random.key(0))
  tokens = jnp.asarray(np.random.default_rng(0).integers(1, 20, (2, 8)))
  selected = jnp.zeros((2, 8), bool).at[0, 2].set(True).at[1, 5].set(True)
  batch = {"inputs": tokens, "targets": tokens, "mask": jnp.ones((2, 8), bool),
           "selected": selected}
  loss, aux = mlm.masked_lm_loss(params, batch, model=model)
  logits = model.apply({"params": params}, model.apply({"params": params}, tokens,
                                                       method=model.encode),
                       method=model.mlm_logits)
  log_probs = jax.nn.log_softmax(logits)
  expected = -(log_probs[0, 2, tokens[0, 2]] + log_probs[1, 5, tokens[1, 5]]) / 2
  assert float(loss) == pytest.approx(float(expected), rel=1e-6)
  # Unselected targets are ignored: changing them changes nothing.
  other = {**batch, "targets": batch["targets"].at[0, 0].set(3)}
  assert float(mlm.masked_lm_loss(params, other, model=model)[0]) == float(loss)
  assert 0.0 <= float(aux["accuracy"]) <= 1.0


def test_unigram_baseline_by_hand():
  from jaxllm.tasks import mlm
  # Vocabulary of 4, id 3 special. Train counts of ids 0, 1, 2: 3, 1, 0; add-one: 4, 2, 1.
  # Both splits come as batches (the task's evaluation windows), read one at a time.
  baseline = mlm.unigram_baseline(
      iter([np.array([[0, 0], [0, 1]]), np.array([[3, 3]])]),
      iter([np.array([0, 2]), np.array([3, 1])]), vocab_size=4, special=(3,))
  expected_loss = -np.mean(np.log([4 / 7, 1 / 7, 2 / 7]))  # val's 0, 2, 1 (3 left out)
  assert baseline["unigram_loss"] == pytest.approx(expected_loss, rel=1e-12)
  assert baseline["unigram_accuracy"] == pytest.approx(1 / 3)  # the guess: id 0


def _mlm_config(shared_data, steps):
  from jaxllm import config as config_lib
  config = config_lib.default_config()
  config_lib.apply_overrides(config, [
      "model.architecture=bert", "model.n_layer=1", "model.n_head=2", "model.d_model=32",
      "model.context_length=32", "data.dataset=text", "data.tokenizer=char",
      f"data.path={shared_data / 'the-verdict.txt'}", "train.task=mlm", f"train.steps={steps}",
      "train.batch_size=4", "train.schedule=constant", "train.warmup_steps=0",
      "train.log_every=1", "train.eval_every=3", "train.eval_batches=1",
      "train.peak_flops=1e11", "checkpoint.every_steps=3"])
  return config


def test_mlm_task_resumes_exactly_and_reports_its_baseline(tmp_path, shared_data, capsys):
  from jaxllm.training import loop as trainer

  def losses(workdir):
    records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: (r.get("loss"), r.get("val_loss"), r.get("val_accuracy"))
            for r in records}

  figures = trainer.run(_mlm_config(shared_data, 6), tmp_path / "whole", progress=False)
  # The same run from its step-3 checkpoint: the copy without the later one resumes there.
  shutil.copytree(tmp_path / "whole", tmp_path / "resumed")
  shutil.rmtree(tmp_path / "resumed" / "checkpoints" / "6")
  capsys.readouterr()
  trainer.run(_mlm_config(shared_data, 6), tmp_path / "resumed", progress=False)
  assert "resuming from step 3" in capsys.readouterr().out
  whole, resumed = losses(tmp_path / "whole"), losses(tmp_path / "resumed")
  assert resumed == whole and len(whole) == 7  # the masks of steps 4-6 too: exact
  assert 0.0 <= figures["val_accuracy"] <= 1.0
  # The Verdict's characters, guessed by frequency: about the share of spaces.
  assert 2.5 < figures["unigram_loss"] < 4.0 and 0.1 < figures["unigram_accuracy"] < 0.25
  saved = json.loads((tmp_path / "whole" / "eval.json").read_text())
  assert saved["unigram_loss"] == figures["unigram_loss"]


def test_tasks_refuse_the_other_architecture(tmp_path, shared_data):
  from jaxllm import tasks
  config = _mlm_config(shared_data, 1)
  config.train.task = "lm"
  with pytest.raises(JaxllmError, match="train.task=lm needs a GPT .*train.task=mlm"):
    tasks.build(config)
  config = _mlm_config(shared_data, 1)
  config.model.architecture = "gpt"
  with pytest.raises(JaxllmError, match="train.task=mlm trains an encoder"):
    tasks.build(config)
  config = _mlm_config(shared_data, 1)
  config.train.task, config.classifier.pooling = "classify", "last"
  config.data.update(path=str(shared_data / "SMSSpamCollection"), tokenizer="gpt2")
  config.classifier.update(text_column="1", label_column="0", labels="ham,spam")
  with pytest.raises(JaxllmError, match="classifier.pooling='last' does not apply to an "
                                        "encoder: take cls or mean"):
    tasks.build(config)
  config.classifier.update(pooling="cls", max_length=64)  # context_length is 32
  with pytest.raises(JaxllmError, match="max_length=64 exceeds the model's context length 32 "
                                        r"\(model.context_length; a BERT's "
                                        r"max_position_embeddings\): lower"):
    tasks.build(config)


@pytest.fixture(scope="module")
def bert_folder(tmp_path_factory):
  """A saved random BertForPreTraining: the tensors bert-base-uncased's file holds (encoder,
  pooler, masked-LM head and the next-sentence head jaxllm has no use for)."""
  folder = tmp_path_factory.mktemp("bert")
  _randomised(transformers.BertForPreTraining(_hf_config())).save_pretrained(folder)
  return folder


def _changed_copy(folder, tmp_path, change_tensors=None, change_config=None):
  from safetensors.numpy import load_file, save_file

  copy = tmp_path / "hf"
  shutil.copytree(folder, copy)
  if change_tensors:
    save_file(change_tensors(load_file(copy / "model.safetensors")), copy / "model.safetensors",
              metadata={"format": "pt"})
  if change_config:
    config = json.loads((copy / "config.json").read_text())
    (copy / "config.json").write_text(json.dumps(change_config(config)))
  return copy


def test_missing_tensors_are_named_with_their_file(bert_folder, tmp_path):
  for name in ("bert.encoder.layer.1.output.dense.weight",  # the encoder's
               "cls.predictions.transform.dense.weight"):  # part of a head the file has
    folder = _changed_copy(bert_folder, tmp_path / name,
                           lambda tensors: {k: v for k, v in tensors.items() if k != name})
    with pytest.raises(JaxllmError, match=f"^{folder / 'model.safetensors'} lacks "
                                          f"'{name.removeprefix('bert.')}', which "
                                          f"{folder / 'config.json'} implies"):
      bert_weights.read_folder(folder)


def test_unexpected_tensors_are_named_but_known_extras_pass(bert_folder, tmp_path):
  _, params, _, _ = bert_weights.read_folder(bert_folder)  # the next-sentence head is dropped
  assert {"pooler", "mlm_bias"} <= set(params)

  def add(extra):
    return lambda tensors: {**tensors, **extra}

  buffers = {"bert.embeddings.position_ids": np.arange(40)[None]}
  folder = _changed_copy(bert_folder, tmp_path / "a", add(buffers))
  bert_weights.read_folder(folder)
  extra = {f"bert.encoder.layer.{i}.attention.self.relative.weight": np.ones((4, 8), np.float32)
           for i in range(2)}
  folder = _changed_copy(bert_folder, tmp_path / "b", add({**buffers, **extra}))
  with pytest.raises(JaxllmError, match=f"^{folder / 'model.safetensors'} holds 2 tensors that "
                                        r"BERT has not \('encoder.layer.0.attention.self.relative"
                                        r".weight', 'encoder.layer.1.attention.self.relative"
                                        r".weight'\)"):
    bert_weights.read_folder(folder)


def test_a_truncated_checkpoint_and_a_missing_config_key(bert_folder, tmp_path):
  folder = _changed_copy(bert_folder, tmp_path / "a")
  data = (folder / "model.safetensors").read_bytes()
  (folder / "model.safetensors").write_bytes(data[:len(data) // 2])
  with pytest.raises(JaxllmError, match=f"^{folder / 'model.safetensors'} cannot be read .*"
                                        f"download it again"):
    bert_weights.read_folder(folder)
  folder = _changed_copy(bert_folder, tmp_path / "b", change_config=lambda config: {
      k: v for k, v in config.items() if k != "hidden_size"})
  with pytest.raises(JaxllmError, match=f"^{folder / 'config.json'} lacks 'hidden_size'"):
    bert_weights.read_folder(folder)
