"""configs/imagenet: timm train.py recipes (issue 27, item 3). Every YAML parses, names a registered zoo model,
uses only train.py argument names with values of their argparse types, and says where it comes from; every family
has a recipe unless NO_RECIPE says why not."""
import inspect
import re
from pathlib import Path

import pytest
import yaml

import mixzoo  # noqa: F401  (registers the mz_* models in timm)
from mixzoo import FAMILIES, MODELS

ROOT = Path(__file__).resolve().parents[1] / 'configs' / 'imagenet'
FILES = sorted(ROOT.glob('*.yaml'))

# Dest names of timm's train.py parser (the -c/--config pre-parser's `config` left out). Read from
# huggingface/pytorch-image-models train.py at aa4b5850c1543fa488abf260f18390eda46cf85d (version 1.0.29.dev0,
# the newest commit in this workplace's mirror: the tag v1.0.31 was not there; the pip package timm 1.0.31
# ships no train.py). 1.0.29.dev0 added the train_img_sizes ... variable_batch_loss_scale group to v1.0.28's.
TRAIN_PY_ARGS = set("""
    data data_dir dataset train_split val_split train_num_samples val_num_samples dataset_download class_map
    input_img_mode input_key target_key dataset_trust_remote_code model pretrained pretrained_path
    initial_checkpoint resume no_resume_opt num_classes gp img_size in_chans input_size crop_pct mean std
    interpolation batch_size validation_batch_size channels_last fuser grad_accum_steps grad_checkpointing
    fast_norm model_kwargs head_init_scale head_init_bias torchcompile_mode torchscript torchcompile device
    amp amp_dtype model_dtype no_ddp_bb synchronize_step local_rank device_modules opt opt_eps opt_betas
    momentum weight_decay clip_grad clip_mode layer_decay layer_decay_min_scale layer_decay_no_opt_scale
    opt_kwargs sched sched_on_updates lr lr_base lr_base_size lr_base_scale lr_noise lr_noise_pct
    lr_noise_std lr_cycle_mul lr_cycle_decay lr_cycle_limit lr_k_decay warmup_lr min_lr epochs epoch_repeats
    start_epoch decay_milestones decay_epochs warmup_epochs warmup_prefix cooldown_epochs patience_epochs
    decay_rate no_aug train_crop_mode scale ratio hflip vflip color_jitter color_jitter_prob grayscale_prob
    gaussian_blur_prob aa aug_repeats aug_splits jsd_loss bce_loss bce_sum bce_target_thresh bce_pos_weight
    reprob remode recount resplit mixup cutmix cutmix_minmax mixup_prob mixup_switch_prob mixup_mode
    mixup_off_epoch smoothing train_interpolation drop drop_connect drop_path drop_block bn_momentum bn_eps
    sync_bn dist_bn split_bn model_ema model_ema_force_cpu model_ema_decay model_ema_warmup seed
    worker_seeding log_interval val_interval recovery_interval checkpoint_hist workers save_images pin_mem
    no_prefetcher output experiment eval_metric tta use_multi_epochs_loader log_wandb wandb_project
    wandb_tags wandb_resume_id train_img_sizes train_batch_sizes train_size_probs train_size_schedule
    train_size_schedule_spread train_size_random_mix train_batches_per_epoch variable_batch_loss_scale
    naflex_loader naflex_train_seq_lens naflex_max_seq_len naflex_patch_sizes naflex_patch_size_probs
    naflex_loss_scale naflex_patchify_channels_first kd_model_name kd_distill_type kd_loss_type
    distill_loss_weight task_loss_weight kd_temperature kd_student_feature_dim kd_teacher_feature_dim
    kd_token_distill_type
""".split())
# argparse types of those (type=float / type=int / store_true / nargs) from the same file
FLOAT_ARGS = set("""
    crop_pct head_init_scale head_init_bias opt_eps momentum weight_decay clip_grad layer_decay
    layer_decay_min_scale layer_decay_no_opt_scale lr lr_base lr_noise_pct lr_noise_std lr_cycle_mul
    lr_cycle_decay lr_k_decay warmup_lr min_lr epoch_repeats decay_epochs decay_rate hflip vflip
    color_jitter color_jitter_prob grayscale_prob gaussian_blur_prob aug_repeats bce_target_thresh
    bce_pos_weight reprob mixup cutmix mixup_prob mixup_switch_prob smoothing drop drop_connect
    drop_path drop_block bn_momentum bn_eps model_ema_decay train_size_schedule_spread
    train_size_random_mix distill_loss_weight task_loss_weight kd_temperature
""".split())
INT_ARGS = set("""
    train_num_samples val_num_samples num_classes img_size in_chans batch_size validation_batch_size
    grad_accum_steps local_rank lr_base_size lr_cycle_limit epochs start_epoch warmup_epochs
    cooldown_epochs patience_epochs aug_splits recount mixup_off_epoch seed log_interval val_interval
    recovery_interval checkpoint_hist workers tta train_batches_per_epoch naflex_max_seq_len
    kd_student_feature_dim kd_teacher_feature_dim
""".split())
BOOL_ARGS = set("""
    dataset_download dataset_trust_remote_code pretrained no_resume_opt channels_last grad_checkpointing
    fast_norm torchscript amp no_ddp_bb synchronize_step sched_on_updates no_aug jsd_loss bce_loss
    bce_sum resplit sync_bn split_bn model_ema model_ema_force_cpu model_ema_warmup save_images pin_mem
    no_prefetcher use_multi_epochs_loader log_wandb naflex_loader naflex_patchify_channels_first
    warmup_prefix
""".split())
LIST_ARGS = set("""
    data input_size mean std model_kwargs torchcompile device_modules opt_betas opt_kwargs lr_noise
    decay_milestones scale ratio cutmix_minmax wandb_tags train_img_sizes train_batch_sizes
    train_size_probs naflex_train_seq_lens naflex_patch_sizes naflex_patch_size_probs
""".split())
# string arguments with a fixed set of values (in train.py's help text / the code that reads them)
STR_CHOICES = dict(clip_mode={'norm', 'value', 'agc'}, lr_base_scale={'', 'linear', 'sqrt'},
                   amp_dtype={'float16', 'bfloat16'}, remode={'pixel', 'rand', 'const'},
                   mixup_mode={'batch', 'pair', 'elem'},
                   train_interpolation={'random', 'bilinear', 'bicubic', 'nearest'})

NO_RECIPE = {
    'halonet': "timm's own weights (halonet26t.a1h_in1k, sehalonet33ts.ra2_in1k, halonet50ts.a1h_in1k; halonet_h1 "
               "untrained): timm documents only the recipe families (hfdocs hparams.mdx: 'a1h' = RSB A1 with "
               "stronger dropout / stochastic depth / RandAugment, no numbers; 'ra2' gist is generic), not these "
               "models' settings",
}


def _load(path):
    return yaml.safe_load(path.read_text())


def _schedulers():
    from timm.scheduler import scheduler_factory
    return set(re.findall(r"sched == '(\w+)'", inspect.getsource(scheduler_factory.create_scheduler_v2)))


def test_files_exist():
    assert len(FILES) >= len(FAMILIES) - len(NO_RECIPE)
    assert set(_schedulers()) >= {'cosine', 'poly', 'constant'}


@pytest.mark.parametrize('path', FILES, ids=lambda p: p.stem)
def test_recipe(path):
    text = path.read_text()
    first = text.splitlines()[0]
    assert first.startswith('# Source: '), f'{path.name}: first line must name its source'
    assert re.search(r'[0-9a-f]{40}|Table|paper', first), f'{path.name}: source without commit / table'
    cfg = _load(path)
    assert isinstance(cfg, dict) and cfg
    assert cfg['model'] == path.stem, 'file named after its model'
    assert cfg['model'] in MODELS, f"{cfg['model']} is not a registered zoo model"
    unknown = set(cfg) - TRAIN_PY_ARGS
    assert not unknown, f'not train.py arguments: {sorted(unknown)}'
    for k, v in cfg.items():
        if k in BOOL_ARGS:
            assert isinstance(v, bool), k
        elif k in LIST_ARGS:
            assert isinstance(v, list) and all(isinstance(x, (int, float)) for x in v), k
        elif k in FLOAT_ARGS:
            assert isinstance(v, (int, float)) and not isinstance(v, bool), k
        elif k in INT_ARGS:
            assert isinstance(v, int) and not isinstance(v, bool), k
        else:
            assert isinstance(v, str), k
        if k in STR_CHOICES:
            assert v in STR_CHOICES[k], (k, v)
    import timm.optim
    assert cfg.get('opt', 'sgd') in timm.optim.list_optimizers(), cfg.get('opt')
    assert cfg.get('sched', 'cosine') in _schedulers()
    # an lr: either absolute or from lr_base at a stated global batch (never both)
    assert ('lr' in cfg) != ('lr_base' in cfg), 'set exactly one of lr / lr_base'
    if 'lr_base' in cfg:
        assert 'lr_base_size' in cfg and cfg.get('lr_base_scale') == 'linear', \
            "timm 1.0.x picks sqrt scaling for adam*/lamb optimizers unless lr_base_scale is given"
    if 'aa' in cfg:
        from timm.data import rand_augment_transform
        rand_augment_transform(cfg['aa'], {})


def test_every_family_has_a_recipe():
    have = {MODELS[_load(p)['model']].family for p in FILES}
    assert set(NO_RECIPE) <= set(FAMILIES), 'NO_RECIPE names an unknown family'
    assert not have & set(NO_RECIPE), f'{sorted(have & set(NO_RECIPE))} has recipes: remove it from NO_RECIPE'
    missing = set(FAMILIES) - have - set(NO_RECIPE)
    assert not missing, f'families without recipe or NO_RECIPE entry: {sorted(missing)}'


def test_lr_at_official_batch():
    """lr_base / lr_base_size reproduce the official lr at the official global batch, as train.py computes it
    (lr = lr_base * batch_size * world_size * grad_accum_steps / lr_base_size, linear)."""
    def lr(name, world):
        cfg = _load(ROOT / f'{name}.yaml')
        glob = cfg['batch_size'] * world * cfg.get('grad_accum_steps', 1)
        return cfg['lr_base'] * glob / cfg['lr_base_size']
    assert lr('mz_biformer_small', 8) == pytest.approx(1e-3)       # 5e-4 per 512, 8 x 128
    assert lr('mz_shvit_s1', 8) == pytest.approx(4e-3)             # 1e-3 per 512, 8 x 256
    assert lr('mz_poolformer_s12', 8) == pytest.approx(1e-3)       # README: 8 x 128, lr 1e-3
    assert lr('mz_l2vit_base', 8) == pytest.approx(4e-3)           # 8 x 128 x 4 accumulation
    assert lr('mz_transnext_tiny', 8) == pytest.approx(1e-3)
    assert lr('mz_maxvit_tiny_tf_224', 32) == pytest.approx(3e-3)  # 4096 on TPU


def test_yaml_through_argparse():
    """One recipe as set_defaults of a parser built from the same names (train.py's own parser is not in the
    timm package): the keys are accepted and the values survive parse_args untouched."""
    import argparse
    p = argparse.ArgumentParser()
    for name in TRAIN_PY_ARGS:
        p.add_argument('--' + name.replace('_', '-'), dest=name, default=None)
    cfg = _load(ROOT / 'mz_poolformer_s12.yaml')
    p.set_defaults(**cfg)
    args = p.parse_args(['--epochs', '300'])
    assert {k: getattr(args, k) for k in cfg} == {**cfg, 'epochs': '300'}
