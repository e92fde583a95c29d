import sys
def main(argv=None):
    print("hello")
