"""A thin FSDP2 pretraining entrypoint over streamshards: ``python -m trainer.pretrain``."""
