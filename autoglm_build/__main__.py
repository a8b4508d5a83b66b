from autoglm_build.cli import main

main()
