#!/usr/bin/env bash
# The seed's single-device explicit-loop command. Extra arguments are appended (and win), e.g.
#   bash run_single_no_trainer.sh --pretrained_model_name_or_path ./my_ldm --max_train_steps 100 --resolution 64
# LAUNCHER replaces 'python -u' (run_multi_no_trainer.sh sets it to paddle.distributed.launch).
${LAUNCHER:-python -u} train_txt2img_laion400m_no_trainer.py \
    --output_dir ./laion400m_pretrain_output_no_trainer \
    --train_batch_size 6 \
    --gradient_accumulation_steps 10 \
    --learning_rate 4.6875e-5 \
    --adam_weight_decay 0.02 \
    --max_train_steps 1000000000 \
    --lr_scheduler "constant" \
    --lr_warmup_steps 0 \
    --logging_steps 50 \
    --save_steps 5000 \
    --seed 23 \
    --num_workers 6 \
    --pretrained_model_name_or_path CompVis/ldm_laion400M_pretrain \
    --file_list ./data/filelist/train.filelist.list \
    --num_inference_steps 200 \
    --model_max_length 77 \
    --tokenizer_name bert-base-uncased \
    "$@"
