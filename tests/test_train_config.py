from phyassist.config import load_config
from phyassist.train.trainer import sft_config


def test_eval_batch_defaults_to_train_batch_and_can_be_set(tmp_path):
    cfg = load_config("smoke", ["train.eval_steps=5"])
    assert sft_config(cfg, tmp_path, has_eval=True).per_device_eval_batch_size == cfg.train.per_device_train_batch_size
    cfg = load_config("recipes/soulchat-llama3.2", ["model.device_map=cpu"])
    args = sft_config(cfg, tmp_path, has_eval=True)
    assert args.per_device_eval_batch_size == 1 and args.per_device_train_batch_size == 2


def test_study_hyperparameters_reach_trl(tmp_path):
    cfg = load_config("paper")
    args = sft_config(cfg, tmp_path, has_eval=False)
    assert (args.learning_rate, args.max_grad_norm, args.max_steps, args.save_steps) == (2e-4, 0.3, 660, 20)
    assert args.gradient_accumulation_steps == 4 and args.per_device_train_batch_size == 4
    assert args.warmup_steps == 0.03 and getattr(args.lr_scheduler_type, "value", args.lr_scheduler_type) == "constant"
