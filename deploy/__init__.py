"""Stage 3: run exported models fast. Imports without deepspeed, peft or bitsandbytes."""
