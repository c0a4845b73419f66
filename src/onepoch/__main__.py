from onepoch.cli import main
from onepoch.distributed import exit_process

exit_process(main())  # a torchrun worker ends with os._exit: no finalization for gloo's thread to meet
