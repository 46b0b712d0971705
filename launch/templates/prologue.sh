set -uo pipefail
RUN_DIR={{run_dir}}
CODE_DIR={{code_dir}}
KIND={{kind}}
m2_log() { echo "[m2megatron $(date +%T)] $*"; }
