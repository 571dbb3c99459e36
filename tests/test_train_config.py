from phyassist.config import load_config
from phyassist.train.sft import sft_config


def test_eval_batch_defaults_to_train_batch_and_can_be_set(tmp_path):
    cfg = load_config("smoke", ["train.eval_steps=5"])
    assert sft_config(cfg, tmp_path, has_eval=True).per_device_eval_batch_size == cfg.train.per_device_train_batch_size
    cfg = load_config("recipes/soulchat-llama3.2", ["model.device_map=cpu"])
    args = sft_config(cfg, tmp_path, has_eval=True)
    assert args.per_device_eval_batch_size == 1 and args.per_device_train_batch_size == 2


def test_study_hyperparameters_reach_trl(tmp_path):
    cfg = load_config("paper")
    args = sft_config(cfg, tmp_path, has_eval=False)
    assert args.router_aux_loss_coef == 0.0  # the study's objective (train.router_aux_loss_coef)
    assert sft_config(load_config("smoke", ["train.router_aux_loss_coef=null"]), tmp_path,
                      has_eval=False).router_aux_loss_coef is None  # TRL's own default
    assert (args.learning_rate, args.max_grad_norm, args.max_steps, args.save_steps) == (2e-4, 0.3, 660, 20)
    assert args.gradient_accumulation_steps == 4 and args.per_device_train_batch_size == 4
    assert args.warmup_steps == 0.03 and getattr(args.lr_scheduler_type, "value", args.lr_scheduler_type) == "constant"


def test_load_best_model_at_end_reaches_trl_only_with_evaluation(tmp_path):
    import pytest

    from phyassist.train.checks import TrainSetupError

    cfg = load_config("smoke", ["train.eval_steps=5", "train.save_steps=10", "train.load_best_model_at_end=true"])
    args = sft_config(cfg, tmp_path, has_eval=True)
    assert args.load_best_model_at_end and args.metric_for_best_model == "eval_loss"
    assert args.greater_is_better is False  # a loss: lower is better
    assert not sft_config(cfg, tmp_path, has_eval=False).load_best_model_at_end
    assert not sft_config(load_config("smoke", ["train.eval_steps=5", "train.save_steps=10"]), tmp_path,
                          has_eval=True).load_best_model_at_end  # off by default
    bad = load_config("smoke", ["train.eval_steps=4", "train.save_steps=10", "train.load_best_model_at_end=true"])
    with pytest.raises(TrainSetupError, match="multiple of train.eval_steps"):
        sft_config(bad, tmp_path, has_eval=True)


def test_recipes_keep_the_best_sft_checkpoint():
    import pytest

    from phyassist.config import ConfigError

    for name in ("recipes/covid", "recipes/covid-smoke", "recipes/soulchat-llama3.2", "recipes/soulchat-smoke"):
        assert load_config(name).train.load_best_model_at_end, name
    with pytest.raises(ConfigError, match="train.load_best_model_at_end"):
        load_config("recipes/covid", ["recipe.sft_load_best=true"])


def test_paper_profile_compiles_the_attention_half_but_patient_jobs_do_not():
    """The study's run compiles its attention halves (bench/trainer_gpu.md); the app's short
    per-patient jobs, on notes of ever-new lengths, never do (and stay valid on a CPU)."""
    from phyassist.app.service import patient_training_config

    paper = load_config("paper")
    assert paper.train.compile_attention and paper.train.gradient_checkpointing == "attention"
    job = patient_training_config(paper, 7)
    assert not job.train.compile_attention and job.train.attention_memory_budget is None


def test_split_head_device_only_for_models_over_several_devices():
    """The trainer moves TRL's token count to the LM head and the loss back only when the model is
    split over devices (the study's two-GPU layer split); a one-device model is left alone."""
    import torch

    from phyassist.train.sft import split_head_device

    class Model(torch.nn.Module):
        def __init__(self, dmap):
            super().__init__()
            self.lm_head = torch.nn.Linear(2, 3)
            self.hf_device_map = dmap

        def get_output_embeddings(self):
            return self.lm_head

    cpu = torch.device("cpu")
    assert split_head_device(Model({"model.layers.0": 0, "lm_head": 0}), cpu) is None
    assert split_head_device(Model({}), cpu) is None
    assert split_head_device(Model({"model.layers.0": 0, "lm_head": 1}), cpu) is None  # head already on `device`
    assert split_head_device(Model({"model.layers.0": 0, "lm_head": 1}), torch.device("meta")) == cpu
