"""Write a filelist of LAION-400M part paths (the seed's: /data/laion400m/part-00000.gz ... part-59999.gz)."""
import argparse
import os


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--data_dir", default="/data/laion400m", help="Directory holding the gzipped parts.")
    parser.add_argument("--num_parts", type=int, default=60000, help="Number of parts, named part-00000.gz upwards.")
    parser.add_argument("--output", default="laion400m_en.filelist", help="Filelist to write, one part path per line.")
    args = parser.parse_args()
    with open(args.output, "w") as f:
        for i in range(args.num_parts):
            f.write(os.path.join(args.data_dir, f"part-{i:05d}.gz") + "\n")
    print(f"wrote {args.num_parts} paths to {args.output}")


if __name__ == "__main__":
    main()
