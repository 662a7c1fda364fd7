"""The likability experiment: jobs/filter_followers.py, detect_faces.py, train_svm.py."""
