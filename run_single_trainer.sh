#!/usr/bin/env bash
# The seed's single-device command. Extra arguments are appended (and win), e.g.
#   bash run_single_trainer.sh --model_name_or_path ./my_ldm --max_steps 100 --resolution 64
# LAUNCHER replaces 'python -u' (run_multi_trainer.sh sets it to paddle.distributed.launch).
${LAUNCHER:-python -u} train_txt2img_laion400m_trainer.py \
    --do_train \
    --output_dir ./laion400m_pretrain_output_trainer \
    --per_device_train_batch_size 6 \
    --gradient_accumulation_steps 10 \
    --learning_rate 4.6875e-5 \
    --weight_decay 0.02 \
    --max_steps 1000000000 \
    --lr_scheduler_type "constant" \
    --warmup_steps 0 \
    --logging_steps 50 \
    --save_steps 5000 \
    --save_total_limit 50 \
    --seed 23 \
    --dataloader_num_workers 6 \
    --model_name_or_path CompVis/ldm_laion400M_pretrain \
    --file_list ./data/filelist/train.filelist.list \
    --num_inference_steps 200 \
    --model_max_length 77 \
    --tokenizer_name bert-base-uncased \
    "$@"
