from moewatch.cli import main

main()
